"""The query path: a query in, hits out, in as few model and FAISS calls as load allows.

``query -> (cache) -> encode batcher -> search batcher -> hits``. Texts are tokenised and
encoded together per batch; images are decoded and preprocessed in the request's own thread
(so a bad image fails alone, early) and encoded together; vectors for one collection and one
filter are searched together with the largest k+offset of the batch, then hydrated with one
metadata query.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
from PIL import UnidentifiedImageError

from indexer.collection import Collection, Hit
from indexer.encoder import Encoder
from indexer.images import ACCEPTED_FORMATS, preprocess_images
from model.data.images import ImageDecodeError, decode_image
from service.batching import Batcher
from service.cache import EmbeddingCache, QueryKind, cache_key
from service.errors import ApiError
from service.metrics import Metrics
from service.registry import CollectionRegistry
from service.settings import Settings

log = logging.getLogger("cots.engine")

EncodeKey = Literal["text", "image"]
SearchKey = tuple[str, str]  # (collection, filters as canonical JSON)


@dataclass(frozen=True)
class Page:
    collection: Collection
    hits: list[Hit]  # this page only
    more: bool  # whether a next page may exist


class QueryEngine:
    def __init__(
        self,
        settings: Settings,
        encoder: Encoder,
        registry: CollectionRegistry,
        cache: EmbeddingCache,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.encoder = encoder
        self.registry = registry
        self.cache = cache
        self.metrics = metrics
        batch = settings.batch
        max_batch = batch.max_batch if batch.enabled else 1
        self.encode_batcher: Batcher[Any, np.ndarray] = Batcher(
            "encode",
            self._encode_batch,
            max_batch=max_batch,
            max_wait_s=batch.max_wait_ms / 1000 if batch.enabled else 0.0,
            max_queue=batch.max_queue,
            metrics=metrics,
            others_in_flight=lambda queued: metrics.in_flight > queued,
        )
        # No wait before FAISS: an encoder batch hands its queries on together, and a wait
        # here would only add latency.
        self.search_batcher: Batcher[tuple[np.ndarray, int], tuple[Collection, list[Hit]]] = (
            Batcher(
                "search",
                self._search_batch,
                max_batch=max_batch,
                max_wait_s=0.0,
                max_queue=batch.max_queue,
                metrics=metrics,
            )
        )

    def start(self) -> None:
        self.encode_batcher.start()
        self.search_batcher.start()

    async def stop(self) -> None:
        await self.encode_batcher.stop()
        await self.search_batcher.stop()

    # Checking inputs (request threads) -----------------------------------------------------

    def check_text(self, text: str) -> str:
        limit = self.settings.limits.max_text_chars
        if len(text) > limit:
            raise ApiError(422, f"text is {len(text):,} characters; the limit is {limit:,}")
        if not text.strip():
            raise ApiError(422, "text is empty (only whitespace)")
        return text

    def prepare_image(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> the model's input pixels [3, S, S]; 400/413/415 if unusable."""
        limit = self.settings.limits.max_image_pixels
        with self.metrics.stage("preprocess"):
            try:
                image = decode_image(data, max_pixels=limit, formats=ACCEPTED_FORMATS)
            except ImageDecodeError as error:
                if error.reason == "image too large":
                    raise ApiError(413, f"image too large: {error.detail}") from None
                if isinstance(error.__cause__, UnidentifiedImageError):
                    raise ApiError(
                        415,
                        f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})",
                    ) from None
                raise ApiError(400, f"unusable image: {error}") from None
            return preprocess_images([image], self.encoder.manifest.image)[0]

    def check_embedding(self, values: Sequence[float]) -> np.ndarray:
        vector = np.asarray(values, dtype=np.float64)  # float64: no overflow in the norm
        if vector.shape != (self.encoder.dim,):
            raise ApiError(
                422,
                f"embedding has {vector.size} values; this model's vectors have {self.encoder.dim}",
            )
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise ApiError(422, "embedding must be finite and not all zeros")
        return (vector / norm).astype(np.float32)

    def check_page(self, k: int, offset: int) -> None:
        limits = self.settings.limits
        if k > limits.max_k:
            raise ApiError(422, f"k is {k}; the limit is {limits.max_k}")
        if offset > limits.max_offset:
            raise ApiError(422, f"offset is {offset}; the limit is {limits.max_offset}")

    # Embedding --------------------------------------------------------------------------------

    async def embed_text(self, text: str) -> tuple[np.ndarray, bool]:
        """(unit vector, came from the cache) of one query text."""
        return await self._embed("text", text, self.check_text(text))

    async def embed_image(self, data: bytes, pixels: np.ndarray) -> tuple[np.ndarray, bool]:
        """(unit vector, came from the cache) of an image already checked by prepare_image."""
        return await self._embed("image", data, pixels)

    async def _embed(
        self, kind: QueryKind, query: str | bytes, payload: Any
    ) -> tuple[np.ndarray, bool]:
        key = cache_key(self.encoder.bundle_id, kind, query)
        cached = await self.cache.get(key)
        if cached is not None:
            return cached, True
        vector = await self.encode_batcher.submit(kind, payload)
        await self.cache.put(key, vector)
        return vector, False

    def _encode_batch(self, key: Hashable, payloads: Sequence[Any]) -> list[np.ndarray]:
        if key == "text":
            with self.metrics.stage("tokenise"):
                tokens = self.encoder.tokenizer(list(payloads))
            with self.metrics.stage("encode"):
                vectors = self.encoder.run("text", tokens)
        else:
            with self.metrics.stage("encode"):
                vectors = self.encoder.run("image", np.stack(payloads))
        return list(vectors)

    # Searching --------------------------------------------------------------------------------

    def collection(self, name: str) -> Collection:
        found = self.registry.get(name)
        if found is None:
            why = self.registry.errors.get(name)
            if why:
                raise ApiError(503, f"collection {name!r} is not available: {why}")
            known = ", ".join(self.registry.loaded()) or "none"
            raise ApiError(404, f"no collection {name!r} (served: {known})")
        return found

    async def search(
        self,
        name: str,
        vector: np.ndarray,
        *,
        k: int,
        offset: int = 0,
        filters: dict[str, Any] | None = None,
    ) -> Page:
        self.check_page(k, offset)
        key: SearchKey = (name, json.dumps(filters or {}, sort_keys=True))
        collection, hits = await self.search_batcher.submit(key, (vector, k + offset))
        page = hits[offset : offset + k]
        return Page(collection, page, more=len(hits) == k + offset)

    def _search_batch(
        self, key: Hashable, payloads: Sequence[tuple[np.ndarray, int]]
    ) -> list[tuple[Collection, list[Hit]]]:
        name, filters_json = cast(SearchKey, key)
        collection = self.collection(name)  # the version live now: a swap may have happened
        filters = json.loads(filters_json) or None
        wanted = max(n for _, n in payloads)
        queries = np.stack([vector for vector, _ in payloads])
        with self.metrics.stage("search"):
            try:
                scores, ids = collection.nearest(queries, wanted, filters=filters)
            except ValueError as error:  # a filter the store refuses
                raise ApiError(422, str(error)) from None
        with self.metrics.stage("hydrate"):
            hits = collection.hydrate(scores, ids, wanted)
        return [(collection, row[:n]) for row, (_, n) in zip(hits, payloads, strict=True)]
