"""Sync: make a collection equal to a folder under the data root, as a job."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from indexer.jobs import SyncRequest
from service.api import API_PREFIX
from service.api.deps import CollectionName, StateDep, WriteCaller
from service.errors import InvalidInputError
from service.schemas import ERROR_RESPONSES, JobInfo
from service.uploads import resolve_data_path

router = APIRouter(
    prefix=f"{API_PREFIX}/collections", tags=["collections"], responses=ERROR_RESPONSES
)


class SyncBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    corpus: str = Field(
        min_length=1,
        max_length=4096,
        description="the folder, relative to the server's data root (COTS_DATA_ROOT)",
        examples=["photos"],
    )
    kind: Literal["image", "video"] = Field("image", description="which files are the items")


@router.post("/{name}/sync", response_model=JobInfo, status_code=202)
def sync(body: SyncBody, name: CollectionName, state: StateDep, caller: WriteCaller) -> JobInfo:
    """Embed the folder's new and changed files and remove the deleted ones, as one new
    version (none when nothing changed); a collection that does not exist yet is built from
    the folder. On the Redis queue when there is one; returns the job (poll /v1/jobs/{id})."""
    folder = resolve_data_path(body.corpus, state.settings)
    if not folder.is_dir():
        raise InvalidInputError(f"corpus {body.corpus[:200]!r} is not a folder")
    served = state.registry.get(name)
    if served is not None and served.info.kind != body.kind:
        raise InvalidInputError(
            f"collection {name!r} holds {served.info.kind} items, not {body.kind}"
        )
    request = SyncRequest(
        root=state.settings.index_root,
        collection=name,
        folder=folder,
        kind=body.kind,
        # The served bundle: what the collection must be built with to be searched here.
        bundle=state.bundle,
        workers=0,
    )
    return state.jobs.sync(request)
