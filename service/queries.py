"""Turning what a client sent (text, base64 image, image URL, uploaded file, vector, an item
id to find items like) into one query vector, with the right error for each way it can be
wrong."""

from __future__ import annotations

import base64
import binascii
from typing import Literal
from urllib.parse import urlsplit

import httpx
import numpy as np
from starlette.concurrency import run_in_threadpool

from service.engine import Query, QueryEngine
from service.errors import (
    ForbiddenError,
    InputTooLargeError,
    InvalidInputError,
    MalformedInputError,
)
from service.settings import Settings

QueryKind = Literal["text", "image", "embedding", "similar_to"]


def decode_base64_image(data: str, max_bytes: int) -> bytes:
    """Bytes of a base64 image (optionally a ``data:image/...;base64,`` URL)."""
    if data.startswith("data:"):
        header, _, data = data.partition(",")
        if ";base64" not in header:
            raise MalformedInputError(
                "a data: URL image must be base64 (data:image/png;base64,...)"
            )
    if len(data) * 3 // 4 > max_bytes:
        raise InputTooLargeError(f"image over the limit of {max_bytes:,} bytes")
    try:
        return base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise MalformedInputError("image is not valid base64") from None


async def fetch_image(url: str, settings: Settings) -> bytes:
    """An allow-listed image URL's bytes; 403 when fetching is off or the host is not allowed."""
    allowed = {host.lower() for host in settings.url_fetch_allowlist}
    if not allowed:
        raise ForbiddenError(
            "this server does not fetch URLs (COTS_URL_FETCH_ALLOWLIST is empty); "
            "send the image itself (base64 or upload)",
        )
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise MalformedInputError(f"image_url must be an http(s) URL, got {url[:100]!r}")
    if host not in allowed:
        raise ForbiddenError(f"host {host!r} is not in the URL allow-list")
    limit = settings.limits.max_body_bytes
    try:
        async with (
            httpx.AsyncClient(timeout=10, follow_redirects=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise MalformedInputError(f"fetching {url[:100]} answered {response.status_code}")
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > limit:
                    raise InputTooLargeError(f"the image at {url[:100]} is over {limit:,} bytes")
                chunks.append(chunk)
    except httpx.HTTPError as error:
        raise MalformedInputError(f"cannot fetch {url[:100]}: {type(error).__name__}") from None
    return b"".join(chunks)


async def search_query(
    engine: QueryEngine,
    *,
    text: str | None = None,
    image: bytes | None = None,
    embedding: list[float] | None = None,
    similar_to: tuple[str, int] | None = None,
) -> Query:
    """The checked query of exactly one given input (an image decoded and preprocessed in a
    worker thread), not yet encoded: ``QueryEngine.find`` encodes it in its search batch.
    ``similar_to``: (collection, item id), whose stored vector is the query."""
    if text is not None:
        return engine.text_query(text)
    if image is not None:
        pixels = await run_in_threadpool(engine.prepare_image, image)
        return engine.image_query(image, pixels)
    if embedding is not None:
        return engine.embedding_query(embedding)
    if similar_to is not None:
        return engine.similar_query(*similar_to)
    raise InvalidInputError("give exactly one of text, image, image_url, embedding, similar_to")


async def query_vector(
    engine: QueryEngine,
    *,
    text: str | None = None,
    image: bytes | None = None,
    embedding: list[float] | None = None,
) -> tuple[np.ndarray, bool, QueryKind]:
    """(unit vector, from the cache, what the query was) of exactly one given input."""
    query = await search_query(engine, text=text, image=image, embedding=embedding)
    vector, cached = await engine.embed(query)
    return vector, cached, query.kind
