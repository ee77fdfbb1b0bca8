"""clip-retrieval's back-end API, so ``ClipClient`` and clip-front work against this server.

The wire format is clip-retrieval's (``clip_back.py``): bodies are JSON whatever the
Content-Type says; ``/knn-service`` answers a JSON array of ``{id, similarity, ...metadata}``
(``url`` and ``caption`` among the metadata), with metadata only for the first ``num_images``
of ``num_result_ids`` results; ``/metadata`` answers ``[{id, metadata}]``. The results are
capped at the server's ``max_k`` rather than refused: clip-front asks for 3000 result ids (and
10,000 to download), and clip-retrieval's own back end may answer fewer than asked.

An ``indice_name`` is a collection. ``modality`` is what the results are: ``image`` (an image
or video collection) or ``text`` (a caption collection); a mismatch is a 400 that names the
collections that would fit. Deduplication, safety and aesthetic options are accepted and
ignored: this server has no such models.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from indexer.collection import Collection
from indexer.metadata import Item
from service.api.deps import EngineDep, SearchCaller, SettingsDep, StateDep
from service.api.errors import validation_message
from service.errors import InvalidInputError, MalformedInputError, NotFoundError
from service.queries import decode_base64_image, fetch_image, query_vector
from service.schemas import ERROR_RESPONSES

router = APIRouter(tags=["clip-retrieval"], responses=ERROR_RESPONSES)

_RESULT_KINDS = {"image": ("image", "video"), "text": ("caption",)}


class KnnRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clip-front sends options we do not use

    text: str | None = None
    image: str | None = None
    image_url: str | None = None
    embedding_input: list[float] | None = None
    modality: Literal["image", "text"] = "image"
    num_images: int = Field(40, ge=1, le=10_000)
    num_result_ids: int | None = Field(None, ge=1, le=10_000)
    indice_name: str | None = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[Annotated[int, Field(ge=0, lt=2**63)]] = Field(max_length=10_000)
    indice_name: str | None = None


def _documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """The body in the OpenAPI document: the routes read it themselves (JSON whatever the
    Content-Type: clip-front sends text/plain), so FastAPI cannot describe it."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw or b"null")
    except (UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: deep nesting
        raise MalformedInputError("the body must be JSON (whatever the Content-Type)") from None


def _parse(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise InvalidInputError(validation_message(error.errors())[0]) from None


def _pick(engine: EngineDep, name: str | None, modality: str | None) -> Collection:
    loaded = engine.registry.loaded()
    if name is None:
        fitting = [
            n
            for n, c in sorted(loaded.items())
            if modality is None or c.info.kind in _RESULT_KINDS[modality]
        ]
        if not fitting:
            raise NotFoundError("no collection is served")
        name = fitting[0]
    collection = engine.collection(name)
    if modality is not None and collection.info.kind not in _RESULT_KINDS[modality]:
        fitting = [n for n, c in sorted(loaded.items()) if c.info.kind in _RESULT_KINDS[modality]]
        raise MalformedInputError(
            f"indice {name!r} holds {collection.info.kind} items, not modality {modality!r} "
            f"results; indices that do: {', '.join(fitting) or 'none'}",
        )
    return collection


def _metadata(name: str, item: Item | None, request: Request) -> dict[str, Any]:
    if item is None:
        return {}
    url = item.uri
    if not url.startswith(("http://", "https://")):
        url = str(request.url_for("get_media", name=name, item_id=item.id))
    meta: dict[str, Any] = {**item.metadata, "url": url, "caption": item.caption}
    if item.start_s is not None:
        meta.update(start_s=item.start_s, end_s=item.end_s)
    return meta


@router.post("/knn-service", openapi_extra=_documented_body(KnnRequest))
async def knn_service(
    request: Request, engine: EngineDep, settings: SettingsDep, caller: SearchCaller
) -> list[dict[str, Any]]:
    """clip-retrieval's search: nearest items to a text, base64 image, image URL or vector."""
    body: KnnRequest = _parse(KnnRequest, await _json_body(request))
    collection = _pick(engine, body.indice_name, body.modality)
    name = collection.info.collection
    image = None
    if body.image:
        image = decode_base64_image(body.image, settings.limits.max_body_bytes)
    elif body.image_url:
        image = await fetch_image(body.image_url, settings)
    if not (body.text or image or body.embedding_input):
        raise MalformedInputError("must fill one of text, image, image_url and embedding_input")
    vector, _, _ = await query_vector(
        engine, text=body.text or None, image=image, embedding=body.embedding_input or None
    )
    # clip-back searches num_result_ids (default num_images), and hydrates the first num_images.
    wanted = min(body.num_result_ids or body.num_images, settings.limits.max_k)
    page = await engine.search(name, vector, k=wanted)
    results = []
    for position, hit in enumerate(page.hits):
        row = _metadata(name, hit.item, request) if position < body.num_images else {}
        row.update(id=hit.id, similarity=hit.score)
        results.append(row)
    return results


@router.get("/indices-list")
def indices_list(state: StateDep, caller: SearchCaller) -> list[str]:
    """The collections, as clip-retrieval's index names."""
    return sorted(state.registry.loaded())


@router.post("/metadata", openapi_extra=_documented_body(MetadataRequest))
async def metadata(
    request: Request, engine: EngineDep, caller: SearchCaller
) -> list[dict[str, Any]]:
    """Metadata of result ids: ``[{id, metadata}]``."""
    body: MetadataRequest = _parse(MetadataRequest, await _json_body(request))
    if not body.ids:
        return []
    collection = _pick(engine, body.indice_name, None)
    name = collection.info.collection
    items = collection.get(body.ids)
    return [
        {"id": i, "metadata": _metadata(name, item, request)}
        for i, item in zip(body.ids, items, strict=True)
    ]
