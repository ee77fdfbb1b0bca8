"""Search a collection by text, image (base64, URL or upload) or vector."""

from __future__ import annotations

import json
import time
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import TypeAdapter, ValidationError

from indexer.collection import Hit
from service.api import API_PREFIX
from service.api.deps import CollectionDep, EngineDep, SearchCaller, SettingsDep
from service.engine import Page
from service.errors import ApiError
from service.queries import QueryKind, decode_base64_image, fetch_image, query_vector
from service.schemas import ERROR_RESPONSES, Filters, SearchHit, SearchRequest, SearchResponse

router = APIRouter(prefix=f"{API_PREFIX}/collections", tags=["search"], responses=ERROR_RESPONSES)


def hit_model(collection: str, hit: Hit) -> SearchHit:
    item = hit.item
    return SearchHit(
        id=hit.id,
        score=hit.score,
        kind=item.kind,
        uri=item.uri,
        caption=item.caption,
        group_id=item.group_id,
        metadata=item.metadata,
        start_s=item.start_s,
        end_s=item.end_s,
        media_url=f"{API_PREFIX}/collections/{collection}/items/{hit.id}/media",
    )


def page_response(
    name: str, page: Page, *, query: QueryKind, k: int, offset: int, cached: bool, start: float
) -> SearchResponse:
    return SearchResponse(
        collection=name,
        version=page.collection.version,
        query=query,
        k=k,
        offset=offset,
        cached=cached,
        took_ms=round((time.perf_counter() - start) * 1000, 3),
        next_offset=offset + k if page.more else None,
        hits=[hit_model(name, hit) for hit in page.hits],
    )


@router.post("/{name}/search", response_model=SearchResponse)
async def search(
    body: SearchRequest,
    collection: CollectionDep,
    engine: EngineDep,
    settings: SettingsDep,
    caller: SearchCaller,
) -> SearchResponse:
    """Top-k items of the collection for one query (text, image, image_url or embedding).

    Text → image/video/caption collections (a video hit carries its moment's start_s/end_s),
    image → caption collections (its captions) or image collections (similar images).
    """
    start = time.perf_counter()
    name = collection.info.collection
    engine.check_page(body.k, body.offset)
    image = None
    if body.image is not None:
        image = decode_base64_image(body.image, settings.limits.max_body_bytes)
    elif body.image_url is not None:
        image = await fetch_image(body.image_url, settings)
    vector, cached, kind = await query_vector(
        engine, text=body.text, image=image, embedding=body.embedding
    )
    page = await engine.search(name, vector, k=body.k, offset=body.offset, filters=body.filters)
    return page_response(
        name, page, query=kind, k=body.k, offset=body.offset, cached=cached, start=start
    )


_FILTERS = TypeAdapter(Filters)


@router.post("/{name}/search/upload", response_model=SearchResponse)
async def search_upload(
    image: Annotated[UploadFile, File(description="the query image")],
    collection: CollectionDep,
    engine: EngineDep,
    caller: SearchCaller,
    k: Annotated[int, Form(ge=1, le=10_000)] = 10,
    offset: Annotated[int, Form(ge=0, le=1_000_000)] = 0,
    filters: Annotated[str | None, Form(description="filters as a JSON object")] = None,
) -> SearchResponse:
    """Search with an uploaded image file (multipart/form-data)."""
    start = time.perf_counter()
    name = collection.info.collection
    engine.check_page(k, offset)
    parsed = None
    if filters:
        try:
            parsed = _FILTERS.validate_python(json.loads(filters))
        except (ValueError, ValidationError):
            raise ApiError(422, "filters must be a JSON object of str/number/bool values") from None
    data = await image.read()
    vector, cached, kind = await query_vector(engine, image=data)
    page = await engine.search(name, vector, k=k, offset=offset, filters=parsed)
    return page_response(name, page, query=kind, k=k, offset=offset, cached=cached, start=start)
