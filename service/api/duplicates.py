"""Near-duplicates of a collection as a job: ``POST /v1/collections/{name}/duplicates``.

The work is ``indexer.duplicates`` (a range search over the stored vectors), run on the Redis
queue by ``cots worker`` when Redis is configured, in this process otherwise, as compaction
is. The job's result is the groups (``GET /v1/jobs/{id}``). Scope ``write``: it costs a pass
over the whole collection, and reading a job's result needs that scope anyway.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from indexer.duplicates import MIN_SCORE_FLOOR
from indexer.jobs import DuplicatesRequest
from service.api import API_PREFIX
from service.api.deps import CollectionDep, StateDep, WriteCaller
from service.schemas import ERROR_RESPONSES, JobInfo

router = APIRouter(
    prefix=f"{API_PREFIX}/collections", tags=["collections"], responses=ERROR_RESPONSES
)


class DuplicatesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_score: float = Field(
        0.97,
        ge=MIN_SCORE_FLOOR,
        le=1.0,
        description="items whose vectors' cosine similarity is at least this are duplicates",
    )


@router.post("/{name}/duplicates", response_model=JobInfo, status_code=202)
def find_duplicates(
    body: DuplicatesBody, collection: CollectionDep, state: StateDep, caller: WriteCaller
) -> JobInfo:
    """Groups of near-identical image and video items of the live version (removed items
    left out), as a job whose result is ``{"collection", "version", "min_score", "checked",
    "groups": [{"items": [{"id", "score", "uri"}]}]}``: each group by id with each item's
    score to the first, groups largest first."""
    request = DuplicatesRequest(
        root=state.settings.index_root,
        collection=collection.info.collection,
        min_score=body.min_score,
    )
    return state.jobs.duplicates(request)
