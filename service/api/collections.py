"""Collections: list, describe, items and their files, add, remove, re-index, job status."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from indexer.build_spec import BuildSpec
from indexer.collection import Collection, Hit
from indexer.compaction import CompactionPolicy
from indexer.errors import FactoryError
from indexer.faiss_index import new_index
from indexer.jobs import CompactionRequest
from indexer.update import add_to_collection, remove_from_collection
from indexer.versions import list_versions
from service import thumbnails
from service.api import API_PREFIX
from service.api.deps import (
    AdminCaller,
    CollectionDep,
    SearchCaller,
    SettingsDep,
    StateDep,
    WriteCaller,
)
from service.api.errors import validation_message
from service.api.search import hit_model
from service.errors import InvalidInputError, NotFoundError
from service.schemas import (
    ERROR_RESPONSES,
    AddItemsRequest,
    CollectionInfo,
    CollectionList,
    CompactRequest,
    JobInfo,
    ReindexRequest,
    RemoveItemsRequest,
    SearchHit,
    SegmentInfo,
)
from service.uploads import resolve_data_path, write_items_corpus

router = APIRouter(
    prefix=f"{API_PREFIX}/collections", tags=["collections"], responses=ERROR_RESPONSES
)
jobs_router = APIRouter(
    prefix=f"{API_PREFIX}/jobs", tags=["collections"], responses=ERROR_RESPONSES
)

_MEDIA_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
    | {".mp4", ".webm", ".mkv", ".mov", ".avi"}
)
ItemId = Annotated[int, PathParam(ge=0, lt=2**63, description="item id")]
# Files and thumbnails alike: a thumbnail's ETag lets a browser revalidate it after an hour.
_MEDIA_CACHE = "public, max-age=3600"


def describe(collection: Collection, root: Path) -> CollectionInfo:
    info = collection.info
    return CollectionInfo(
        name=info.collection,
        kind=info.kind,
        modality=info.modality,
        version=collection.version,
        count=info.count,
        live=info.live,
        dim=info.dim,
        index_type=info.factory,
        model_bundle_id=info.model_bundle_id,
        recall_at_10=info.recall_at_10,
        created=info.created,
        versions=list_versions(root, info.collection),
        segments=[
            SegmentInfo(id=s.id, count=s.info.count, tombstones=dead, index_type=s.info.factory)
            for s, dead in collection.segments.summary()
        ],
        tombstones=len(collection.segments.deleted),
        size_bytes=collection.size_bytes(),
    )


@router.get("", response_model=CollectionList)
def list_collections(state: StateDep, caller: SearchCaller) -> CollectionList:
    """Every served collection, and those that could not be loaded with the reason."""
    loaded = state.registry.loaded()
    return CollectionList(
        collections=[describe(loaded[name], state.settings.index_root) for name in sorted(loaded)],
        unavailable=dict(state.registry.errors),
    )


@router.get("/{name}", response_model=CollectionInfo)
def get_collection(
    collection: CollectionDep, settings: SettingsDep, caller: SearchCaller
) -> CollectionInfo:
    """Size, live version, model bundle id, index type and measured recall of a collection."""
    return describe(collection, settings.index_root)


def _item(collection: Collection, item_id: int) -> SearchHit:
    (item,) = collection.get([item_id])
    if item is None:
        raise NotFoundError(f"no item {item_id} in collection {collection.info.collection!r}")
    return hit_model(collection.info.collection, Hit(item_id, 1.0, item))


@router.get("/{name}/items/{item_id:int}", response_model=SearchHit)
def get_item(collection: CollectionDep, item_id: ItemId, caller: SearchCaller) -> SearchHit:
    """One item's metadata (score is 1)."""
    return _item(collection, item_id)


@router.get(
    "/{name}/items/{item_id:int}/media",
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}, "video/*": {}}}, 304: {"description": "unchanged"}},
)
def get_media(
    collection: CollectionDep,
    item_id: ItemId,
    settings: SettingsDep,
    caller: SearchCaller,
    request: Request,
    w: Annotated[
        int | None,
        Query(
            description=f"a JPEG thumbnail this wide ({thumbnails.MIN_WIDTH}-"
            f"{thumbnails.MAX_WIDTH}; never wider than the file), EXIF-upright; a video's "
            "is the frame at the moment's start"
        ),
    ] = None,
) -> Response:
    """The image or video file of an item, when its uri is a file on this server; with
    ``w``, a cached thumbnail of it. A plain ``def``: the thumbnail's decoding runs in the
    thread pool, off the event loop."""
    hit = _item(collection, item_id)
    path = Path(hit.uri)
    if path.suffix.lower() not in _MEDIA_SUFFIXES or not path.is_file():
        raise NotFoundError(f"item {item_id} has no file on this server ({hit.uri[:200]})")
    if w is None:
        return FileResponse(path, headers={"Cache-Control": _MEDIA_CACHE})
    thumbnails.check_width(w)
    folder = settings.thumbnail_dir or settings.index_root / ".thumbnails"
    start_s = hit.start_s if path.suffix.lower() in thumbnails.VIDEO_SUFFIXES else None
    etag = f'"{thumbnails.cache_key(path, w, start_s)}"'
    headers = {"Cache-Control": _MEDIA_CACHE, "ETag": etag}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)  # nothing decoded, nothing sent
    thumb = thumbnails.thumbnail(
        path, w, folder=folder, max_pixels=settings.limits.max_image_pixels, start_s=start_s
    )
    headers["ETag"] = f'"{thumb.etag}"'  # the file's key now, should it have changed since
    if thumb.path is None:  # the cache folder is not writable: the bytes from memory
        return Response(thumb.data, media_type=thumbnails.MEDIA_TYPE, headers=headers)
    return FileResponse(thumb.path, media_type=thumbnails.MEDIA_TYPE, headers=headers)


@router.post("/{name}/items", response_model=JobInfo, status_code=202)
async def add_items(
    body: AddItemsRequest, collection: CollectionDep, state: StateDep, caller: WriteCaller
) -> JobInfo:
    """Embed and add items (base64 images, or files under the data root) as a new version;
    returns the job (poll /v1/jobs/{id})."""
    info = collection.info
    if info.kind == "video" and any(item.image is not None for item in body.items):
        raise InvalidInputError("a video collection takes video files by path, not images")
    corpus = await run_in_threadpool(
        write_items_corpus, body.items, info.collection, state.settings
    )
    spec = BuildSpec(
        collection=info.collection,
        root=state.settings.index_root,
        bundle=state.bundle,
        corpus=str(corpus),
        kind=info.kind,
        workers=0,
    )
    return state.jobs.run_here("add", info.collection, lambda: add_to_collection(spec))


@router.post("/{name}/items/remove", response_model=JobInfo, status_code=202)
def remove_items(
    body: RemoveItemsRequest, collection: CollectionDep, state: StateDep, caller: WriteCaller
) -> JobInfo:
    """Remove items by id and/or filter, as a new version; returns the job."""
    name = collection.info.collection
    root = state.settings.index_root

    def work() -> tuple[int, dict[str, int]]:
        version, removed = remove_from_collection(root, name, ids=body.ids, filters=body.filters)
        return version, {"removed": removed}

    return state.jobs.run_here("remove", name, work)


@router.post("/{name}/reindex", response_model=JobInfo, status_code=202)
def reindex(
    body: ReindexRequest, collection: CollectionDep, state: StateDep, caller: AdminCaller
) -> JobInfo:
    """Rebuild the collection from its corpus (or another under the data root) as a new
    version, on the Redis queue when there is one; returns the job."""
    info = collection.info
    recorded = dict(info.build)
    if body.corpus is not None:
        corpus = str(resolve_data_path(body.corpus, state.settings))
    elif "corpus" in recorded:
        corpus = str(recorded["corpus"])
    else:
        raise InvalidInputError(f"collection {info.collection!r} records no corpus; name one")
    try:
        spec = BuildSpec(
            collection=info.collection,
            root=state.settings.index_root,
            bundle=state.bundle,
            corpus=corpus,
            kind=info.kind,
            split=body.split if body.split is not None else recorded.get("split"),
            factory=body.factory or recorded.get("factory", "auto"),
            segment_seconds=recorded.get("segment_seconds", 2.0),
        )
    except ValidationError as error:
        raise InvalidInputError(validation_message(error.errors())[0]) from None
    if spec.factory != "auto":
        try:  # refuse a bad factory now rather than as a failed job
            new_index(spec.factory, info.dim)
        except FactoryError as error:
            raise InvalidInputError(str(error)[:300]) from None
    return state.jobs.reindex(spec)


@router.post("/{name}/compact", response_model=JobInfo, status_code=202)
def compact(
    body: CompactRequest, collection: CollectionDep, state: StateDep, caller: AdminCaller
) -> JobInfo:
    """Merge segments and drop removed items as the policy says, as a new version (when
    there is anything to merge), on the Redis queue when there is one; returns the job."""
    policy = CompactionPolicy(**body.model_dump())
    request = CompactionRequest(
        root=state.settings.index_root, collection=collection.info.collection, policy=policy
    )
    return state.jobs.compact(request)


@jobs_router.get("/{job_id}", response_model=JobInfo)
def get_job(
    job_id: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,80}$")],
    state: StateDep,
    caller: WriteCaller,
) -> JobInfo:
    """Status, progress, result or error of a job."""
    return state.jobs.status(job_id)
