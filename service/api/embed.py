"""Embeddings of texts and images in the model's space (for clients that search themselves)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, UploadFile

from service.api import API_PREFIX
from service.api.deps import EngineDep, SearchCaller, SettingsDep
from service.errors import InvalidInputError
from service.queries import QueryKind, decode_base64_image, query_vector
from service.schemas import ERROR_RESPONSES, EmbedImagesRequest, EmbedResponse, EmbedTextsRequest

router = APIRouter(prefix=f"{API_PREFIX}/embed", tags=["embed"], responses=ERROR_RESPONSES)


def _check_count(count: int, settings: SettingsDep) -> None:
    limit = settings.limits.max_batch_inputs
    if count > limit:
        raise InvalidInputError(f"{count} inputs in one request; the limit is {limit}")


async def _embed_all(
    engine: EngineDep, queries: Iterable[Awaitable[tuple[np.ndarray, bool, QueryKind]]]
) -> EmbedResponse:
    """Run the queries together (they join the encoder's batches) and answer in order."""
    results = await asyncio.gather(*queries)
    return EmbedResponse(
        model_bundle_id=engine.encoder.bundle_id,
        dim=engine.encoder.dim,
        embeddings=[[float(x) for x in vector] for vector, _, _ in results],
    )


@router.post("/texts", response_model=EmbedResponse)
async def embed_texts(
    body: EmbedTextsRequest, engine: EngineDep, settings: SettingsDep, caller: SearchCaller
) -> EmbedResponse:
    """L2-normalised embeddings of texts, in order."""
    _check_count(len(body.texts), settings)
    return await _embed_all(engine, (query_vector(engine, text=text) for text in body.texts))


@router.post("/images", response_model=EmbedResponse)
async def embed_images(
    body: EmbedImagesRequest, engine: EngineDep, settings: SettingsDep, caller: SearchCaller
) -> EmbedResponse:
    """L2-normalised embeddings of base64 images, in order."""
    _check_count(len(body.images), settings)
    limit = settings.limits.max_body_bytes
    images = [decode_base64_image(data, limit) for data in body.images]
    return await _embed_all(engine, (query_vector(engine, image=data) for data in images))


@router.post("/images/upload", response_model=EmbedResponse)
async def embed_uploaded_images(
    images: Annotated[list[UploadFile], File(description="image files")],
    engine: EngineDep,
    settings: SettingsDep,
    caller: SearchCaller,
) -> EmbedResponse:
    """L2-normalised embeddings of uploaded image files (multipart/form-data), in order."""
    _check_count(len(images), settings)
    files = [await image.read() for image in images]
    return await _embed_all(engine, (query_vector(engine, image=data) for data in files))
