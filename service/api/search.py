"""Search a collection by text, image (base64, URL or upload), vector or an item's own vector
(similar_to), with an optional relevance cut-off (min_score) and order (sort)."""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, File, Form, Response, UploadFile
from pydantic import ValidationError

from indexer.collection import Hit
from indexer.filters import Filter
from service.api import API_PREFIX
from service.api.deps import SearchContext, SearchContextDep
from service.api.errors import validation_message
from service.engine import Page
from service.errors import InvalidInputError
from service.queries import QueryKind, decode_base64_image, fetch_image, search_query
from service.schemas import (
    COMPLETE_DOC,
    ERROR_RESPONSES,
    MIN_SCORE_DOC,
    SORT_DOC,
    SORT_NEEDS_MIN_SCORE,
    SORT_PATTERN,
    SearchHit,
    SearchRequest,
    SearchResponse,
)
from service.shard_router import ShardedCollection

router = APIRouter(prefix=f"{API_PREFIX}/collections", tags=["search"], responses=ERROR_RESPONSES)
# On the answer of a sharded collection missing some shards: their numbers, comma-separated.
PARTIAL_HEADER = "X-COTS-Partial"


def hit_fields(collection: str, hit: Hit) -> dict[str, Any]:
    """A hit as the JSON object SearchHit documents."""
    item = hit.item
    return {
        "id": hit.id,
        "score": hit.score,
        "kind": item.kind,
        "uri": item.uri,
        "caption": item.caption,
        "group_id": item.group_id,
        "metadata": item.metadata,
        "start_s": item.start_s,
        "end_s": item.end_s,
        "media_url": f"{API_PREFIX}/collections/{collection}/items/{hit.id}/media",
    }


def hit_model(collection: str, hit: Hit) -> SearchHit:
    return SearchHit.model_validate(hit_fields(collection, hit))


def page_response(
    name: str, page: Page, *, query: QueryKind, k: int, offset: int, cached: bool, start: float
) -> Response:
    """The SearchResponse as JSON bytes, built once: the hits come from the store, already
    validated, and a pydantic model per hit plus the response's validation cost more than
    the FAISS search (issue 18). ``response_model`` still documents it. A sharded
    collection's answer says whether shards were missing (``partial``, ``missing_shards``,
    the ``X-COTS-Partial`` header); other collections' answers leave both fields out."""
    body: dict[str, Any] = {
        "collection": name,
        "version": page.collection.version,
        "query": query,
        "k": k,
        "offset": offset,
        "cached": cached,
        "took_ms": round((time.perf_counter() - start) * 1000, 3),
        "next_offset": offset + k if page.more else None,
        "hits": [hit_fields(name, hit) for hit in page.hits],
    }
    headers = None
    if isinstance(page.collection, ShardedCollection):
        body["partial"] = bool(page.missing)
        body["missing_shards"] = list(page.missing)
        if page.missing:
            headers = {PARTIAL_HEADER: ",".join(str(i) for i in page.missing)}
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


@router.post("/{name}/search", response_model=SearchResponse)
async def search(body: SearchRequest, context: SearchContextDep) -> Response:
    """Top-k items of the collection for one query (text, image, image_url, embedding or
    similar_to).

    Text → image/video/caption collections (a video hit carries its moment's start_s/end_s),
    image → caption collections (its captions) or image collections (similar images),
    similar_to → the items nearest to an indexed item (itself left out). ``min_score`` cuts
    the results off below a score; ``sort`` orders the hits above it by a metadata field.
    """
    return await run_search(body, context, time.perf_counter())


async def run_search(body: SearchRequest, context: SearchContext, start: float) -> Response:
    """The search route's work once the body is valid and the caller allowed: shared with
    :class:`service.fast_search.JsonSearchFastPath`, which reaches it without FastAPI's routing."""
    engine, settings = context.engine, context.settings
    name = context.collection.info.collection
    engine.check_page(body.k, body.offset)
    image = None
    if body.image is not None:
        image = decode_base64_image(body.image, settings.limits.max_body_bytes)
    elif body.image_url is not None:
        image = await fetch_image(body.image_url, settings)
    similar = (name, body.similar_to) if body.similar_to is not None else None
    query = await search_query(
        engine, text=body.text, image=image, embedding=body.embedding, similar_to=similar
    )
    page, cached = await engine.find(
        name,
        query,
        k=body.k,
        offset=body.offset,
        filters=body.filters,
        min_score=body.min_score,
        sort=body.sort,
        complete=body.complete,
    )
    return page_response(
        name, page, query=query.kind, k=body.k, offset=body.offset, cached=cached, start=start
    )


@router.post("/{name}/search/upload", response_model=SearchResponse)
async def search_upload(
    image: Annotated[UploadFile, File(description="the query image")],
    context: SearchContextDep,
    k: Annotated[int, Form(ge=1, description="at most the server's max_k")] = 10,
    offset: Annotated[int, Form(ge=0, description="at most the server's max_offset")] = 0,
    filters: Annotated[str | None, Form(description="filters as a JSON object")] = None,
    min_score: Annotated[float | None, Form(ge=-1.0, le=1.0, description=MIN_SCORE_DOC)] = None,
    sort: Annotated[str | None, Form(pattern=SORT_PATTERN, description=SORT_DOC)] = None,
    complete: Annotated[bool, Form(description=COMPLETE_DOC)] = False,
) -> Response:
    """Search with an uploaded image file (multipart/form-data)."""
    start = time.perf_counter()
    engine = context.engine
    name = context.collection.info.collection
    engine.check_page(k, offset)
    if sort is not None and min_score is None:
        raise InvalidInputError(SORT_NEEDS_MIN_SCORE)
    parsed = None
    if filters:
        try:
            parsed = Filter.model_validate_json(filters)
        except ValidationError as error:
            raise InvalidInputError(validation_message(error.errors(), "filters")[0]) from None
    data = await image.read()
    query = await search_query(engine, image=data)
    page, cached = await engine.find(
        name,
        query,
        k=k,
        offset=offset,
        filters=parsed,
        min_score=min_score,
        sort=sort,
        complete=complete,
    )
    return page_response(
        name, page, query=query.kind, k=k, offset=offset, cached=cached, start=start
    )
