"""The query path: a query in, hits out, in as few model and FAISS calls as load allows.

``query -> (cache) -> search batcher: [encode -> search -> hydrate] -> hits``. A search is
checked and prepared in the request (text limits; an image decoded and preprocessed in the
request's own thread, so a bad image fails alone, early), looked up in the embedding cache,
then handed to the search batcher as one job: the text or pixels to encode, or the vector
when the cache (or the client) already has it. One batch is one trip to the worker thread:
there its texts are tokenised and encoded together, its images together, then its vectors
are searched per collection and filter with the largest k+offset of each group and hydrated
with one metadata query per group. One thread hop per batch, not one per stage: on a loaded
server each hop costs a wake-up of the event loop and a GIL hand-over (issue 18).

``embed_text``/``embed_image`` (the embed API, the demo) use the encode batcher alone;
``search`` takes a vector and skips the encoder.

Relevance and order (issue 37): a ``similar_to`` query is an item's stored vector (read from
its segment, never re-encoded) that leaves the item out; ``min_score`` drops hits below it in
the worker, before hydration, and fetches one hit more than the page to know whether another
page exists; ``sort`` gathers every hit above the cut-off (up to max_offset + max_k) in a
search group of its own, so a deep sorted search never makes its batch-mates fetch as deep,
and orders them (``service.relevance``). A query without these does none of this work.

Sharded collections (``service.shard_router``) are searched through their router, in a batcher
of their own whose batches never run on the event loop's thread (a shard call waits on the
network, up to ``shard_timeout_s``). A shard that does not answer leaves the page without its
items: the page names it (``Page.missing``) and ``cots_partial_results_total`` counts it, or,
when the query asks for complete results, the search fails with 503 and Retry-After.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import numpy as np
from PIL import UnidentifiedImageError

from indexer.collection import Collection, Hit
from indexer.errors import FilterError
from indexer.filters import Filter, as_filter
from runtime.encoder import Encoder
from runtime.errors import ImageDecodeError
from runtime.image_decode import decode_image
from runtime.images import ACCEPTED_FORMATS, preprocess_images
from service.batching import Batcher
from service.cache import EmbeddingCache, cache_key
from service.errors import (
    InputTooLargeError,
    InvalidInputError,
    MalformedInputError,
    NotFoundError,
    UnavailableError,
    UnsupportedMediaError,
)
from service.metrics import Metrics
from service.registry import CollectionRegistry
from service.relevance import sort_hits
from service.schemas import SORT_NEEDS_MIN_SCORE
from service.settings import Settings
from service.shard_router import RETRY_AFTER_S, ShardedCollection

log = logging.getLogger("cots.engine")

EncodeKey = Literal["text", "image"]
# (collection, filters as canonical JSON, deep: a sorted search gathering every hit above its
# cut-off, grouped apart so that its depth is not every batch-mate's)
SearchKey = tuple[str, str, bool]
QueryKindName = Literal["text", "image", "embedding", "similar_to"]
SEARCH_GROUP: Final = "queries"  # one group: a batch splits by modality and collection itself


@dataclass(frozen=True)
class Page:
    collection: Collection
    hits: list[Hit]  # this page only
    more: bool  # whether a next page may exist
    # Shards of a sharded collection that did not answer: their items are not in the page.
    missing: tuple[int, ...] = ()


@dataclass(frozen=True)
class Query:
    """A checked search query, not yet encoded: text or preprocessed pixels for the encoder,
    or a unit vector (``embedding``, ``similar_to``). ``cache_key``: where its vector is cached
    (None: never). ``exclude``: an item id never to return (the item of ``similar_to``)."""

    kind: QueryKindName
    payload: Any
    cache_key: str | None = None
    exclude: int | None = None


@dataclass(frozen=True)
class _Job:
    """One query of a search batch: what to encode (None: ``vector`` is known)."""

    key: SearchKey
    wanted: int  # k + offset, and what the options below need beyond
    encode: tuple[EncodeKey, Any] | None
    vector: np.ndarray | None
    min_score: float | None = None
    exclude: int | None = None
    sort: str | None = None


@dataclass(frozen=True)
class _Found:
    vector: np.ndarray
    collection: Collection
    hits: list[Hit]
    missing: tuple[int, ...] = ()


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
        shared: dict[str, Any] = {
            "max_batch": batch.max_batch if batch.enabled else 1,
            "max_wait_s": batch.max_wait_ms / 1000 if batch.enabled else 0.0,
            "max_queue": batch.max_queue,
            "metrics": metrics,
            "others_in_flight": lambda queued: metrics.in_flight > queued,
            "run_lone_inline": batch.lone_inline,
        }
        self.encode_batcher: Batcher[Any, np.ndarray] = Batcher(
            "encode", self._encode_batch, **shared
        )
        # Encodes and searches in one worker call; it observes the size of each encoder and
        # FAISS call itself (as batcher "encode" and "search").
        self.search_batcher: Batcher[_Job, _Found] = Batcher(
            "search", self._search_batch, observe_batch_size=False, **shared
        )
        # Sharded collections' queries: the same work, always in the worker thread.
        self.shard_batcher: Batcher[_Job, _Found] = Batcher(
            "shards",
            self._search_batch,
            observe_batch_size=False,
            **(shared | {"run_lone_inline": False}),
        )

    def start(self) -> None:
        self.encode_batcher.start()
        self.search_batcher.start()
        self.shard_batcher.start()

    async def stop(self) -> None:
        await self.encode_batcher.stop()
        await self.search_batcher.stop()
        await self.shard_batcher.stop()

    # Checking inputs (request threads) -----------------------------------------------------

    def check_text(self, text: str) -> str:
        limit = self.settings.limits.max_text_chars
        if len(text) > limit:
            raise InvalidInputError(f"text is {len(text):,} characters; the limit is {limit:,}")
        if not text.strip():
            raise InvalidInputError("text is empty (only whitespace)")
        return text

    def prepare_image(self, data: bytes) -> np.ndarray:
        """Encoded image bytes -> the model's input pixels [3, S, S]; 400/413/415 if unusable."""
        limit = self.settings.limits.max_image_pixels
        with self.metrics.stage("preprocess"):
            try:
                image = decode_image(data, max_pixels=limit, formats=ACCEPTED_FORMATS)
            except ImageDecodeError as error:
                if error.reason == "image too large":
                    raise InputTooLargeError(f"image too large: {error.detail}") from None
                if isinstance(error.__cause__, UnidentifiedImageError):
                    raise UnsupportedMediaError(
                        f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})",
                    ) from None
                raise MalformedInputError(f"unusable image: {error}") from None
            return preprocess_images([image], self.encoder.manifest.image)[0]

    def check_embedding(self, values: Sequence[float]) -> np.ndarray:
        vector = np.asarray(values, dtype=np.float64)  # float64: no overflow in the norm
        if vector.shape != (self.encoder.dim,):
            raise InvalidInputError(
                f"embedding has {vector.size} values; this model's vectors have {self.encoder.dim}",
            )
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise InvalidInputError("embedding must be finite and not all zeros")
        return (vector / norm).astype(np.float32)

    def check_page(self, k: int, offset: int) -> None:
        limits = self.settings.limits
        if k > limits.max_k:
            raise InvalidInputError(f"k is {k}; the limit is {limits.max_k}")
        if offset > limits.max_offset:
            raise InvalidInputError(f"offset is {offset}; the limit is {limits.max_offset}")

    def text_query(self, text: str) -> Query:
        key = cache_key(self.encoder.bundle_id, "text", self.check_text(text))
        return Query("text", text, key)

    def image_query(self, data: bytes, pixels: np.ndarray) -> Query:
        """The query of an image already checked by prepare_image; cached by its bytes."""
        return Query("image", pixels, cache_key(self.encoder.bundle_id, "image", data))

    def embedding_query(self, values: Sequence[float]) -> Query:
        return Query("embedding", self.check_embedding(values))

    def similar_query(self, name: str, item_id: int) -> Query:
        """The query "items like item ``item_id``": its stored vector, the item left out;
        404 naming the id when the collection holds no such live item."""
        found = self.collection(name).stored_vectors([item_id]).get(item_id)
        if found is None:
            raise NotFoundError(
                f"no item {item_id} in collection {name!r} (never added, or removed)"
            )
        # Stored as float16 for compressed indexes: unit length again, as a query must be.
        norm = float(np.linalg.norm(found))
        if not np.isfinite(norm) or norm == 0:
            raise InvalidInputError(f"item {item_id} has no usable stored vector")
        return Query("similar_to", (found / norm).astype(np.float32), exclude=item_id)

    # Embedding --------------------------------------------------------------------------------

    async def embed_text(self, text: str) -> tuple[np.ndarray, bool]:
        """(unit vector, came from the cache) of one query text."""
        return await self.embed(self.text_query(text))

    async def embed_image(self, data: bytes, pixels: np.ndarray) -> tuple[np.ndarray, bool]:
        """(unit vector, came from the cache) of an image already checked by prepare_image."""
        return await self.embed(self.image_query(data, pixels))

    async def embed(self, query: Query) -> tuple[np.ndarray, bool]:
        """(unit vector, came from the cache) of a query, through the encode batcher."""
        vector = await self._known_vector(query)
        if vector is not None:
            return vector, query.cache_key is not None
        vector = await self.encode_batcher.submit(query.kind, query.payload)
        await self._remember(query, vector)
        return vector, False

    async def _known_vector(self, query: Query) -> np.ndarray | None:
        """The query's vector without the encoder: its own (an embedding, an item's stored
        vector) or the cache's."""
        if query.kind in ("embedding", "similar_to"):
            return cast(np.ndarray, query.payload)
        if query.cache_key is None:
            return None
        return await self.cache.get(query.cache_key)

    async def _remember(self, query: Query, vector: np.ndarray) -> None:
        if query.cache_key is not None:
            await self.cache.put(query.cache_key, vector)

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
                raise UnavailableError(f"collection {name!r} is not available: {why}")
            known = ", ".join(self.registry.loaded()) or "none"
            raise NotFoundError(f"no collection {name!r} (served: {known})")
        return found

    async def search(
        self,
        name: str,
        vector: np.ndarray,
        *,
        k: int,
        offset: int = 0,
        filters: Filter | None = None,
    ) -> Page:
        """A page of hits for a unit vector (no encoder, no cache)."""
        page, _ = await self.find(
            name, Query("embedding", vector), k=k, offset=offset, filters=filters
        )
        return page

    async def find(
        self,
        name: str,
        query: Query,
        *,
        k: int,
        offset: int = 0,
        filters: Filter | None = None,
        min_score: float | None = None,
        sort: str | None = None,
        complete: bool = False,
    ) -> tuple[Page, bool]:
        """(a page of hits, whether the query's vector came from the cache). ``k`` and
        ``offset`` within the limits: the routes call :meth:`check_page` once, before any work
        (decoding an image, fetching a URL), and the clip-retrieval route caps ``k`` itself.
        ``min_score``: no hit below it; ``sort``: a metadata field (``-field`` descending) that
        orders every hit at or above ``min_score`` (which it needs) before paging.
        ``complete``: a sharded collection with a shard that did not answer raises
        :class:`UnavailableError` (Retry-After) instead of answering a partial page."""
        if sort is not None and min_score is None:
            raise InvalidInputError(SORT_NEEDS_MIN_SCORE)
        canonical = filters.canonical() if filters is not None else {}
        key: SearchKey = (name, json.dumps(canonical, sort_keys=True), sort is not None)
        end = k + offset
        exact = min_score is not None or query.exclude is not None
        if sort is not None:
            limits = self.settings.limits
            wanted = limits.max_offset + limits.max_k
        elif exact:
            wanted = end + 1  # one beyond the page: whether a next page exists, exactly
        else:
            wanted = end
        if query.exclude is not None:
            wanted += 1  # the excluded item may be among them
        vector = await self._known_vector(query)
        cached = vector is not None and query.cache_key is not None
        encode = None if vector is not None else (cast(EncodeKey, query.kind), query.payload)
        job = _Job(key, wanted, encode, vector, min_score, query.exclude, sort)
        sharded = isinstance(self.registry.get(name), ShardedCollection)
        batcher = self.shard_batcher if sharded else self.search_batcher
        found = await batcher.submit(SEARCH_GROUP, job)
        if encode is not None:
            await self._remember(query, found.vector)
        if found.missing:
            if complete:
                shards = ", ".join(str(i) for i in found.missing)
                raise UnavailableError(
                    f"shard {shards} of collection {name!r} did not answer, and complete "
                    f"results were asked for; retry after {RETRY_AFTER_S} s, or leave complete "
                    "out for the other shards' results",
                    retry_after=RETRY_AFTER_S,
                )
            self.metrics.partial_results.labels(name).inc()
        page = found.hits[offset:end]
        more = len(found.hits) > end if exact else len(found.hits) == end
        return Page(found.collection, page, more=more, missing=found.missing), cached

    def _search_batch(self, group: Hashable, jobs: Sequence[_Job]) -> list[_Found | Exception]:
        """Worker thread: encode what needs it (per modality), then search and hydrate (per
        collection and filter). A failure fails the queries it concerns, not the batch."""
        failed: dict[int, Exception] = {}
        vectors = [job.vector for job in jobs]
        for modality in ("text", "image"):
            chosen = [i for i, job in enumerate(jobs) if job.encode and job.encode[0] == modality]
            if not chosen:
                continue
            self.metrics.batch_size.labels("encode").observe(len(chosen))
            try:
                encoded = self._encode_batch(modality, [jobs[i].encode[1] for i in chosen])  # type: ignore[index]
            except Exception as error:
                failed.update((i, error) for i in chosen)
                continue
            for i, vector in zip(chosen, encoded, strict=True):
                vectors[i] = vector
        by_key: dict[SearchKey, list[int]] = {}
        for i, job in enumerate(jobs):
            if i not in failed:
                by_key.setdefault(job.key, []).append(i)
        results: list[_Found | Exception | None] = [failed.get(i) for i in range(len(jobs))]
        for key, chosen in by_key.items():
            self.metrics.batch_size.labels("search").observe(len(chosen))
            queries = np.stack([cast(np.ndarray, vectors[i]) for i in chosen])
            try:
                collection, hits, missing = self._search_group(
                    key, queries, [jobs[i] for i in chosen]
                )
            except Exception as error:
                for i in chosen:
                    results[i] = error
                continue
            for i, row, vector in zip(chosen, hits, queries, strict=True):
                results[i] = _Found(vector, collection, row, missing)
        return cast(list[_Found | Exception], results)

    def _search_group(
        self, key: SearchKey, queries: np.ndarray, jobs: Sequence[_Job]
    ) -> tuple[Collection, list[list[Hit]], tuple[int, ...]]:
        """(the collection searched, each job's hits, the shards that did not answer)."""
        name, filters_json, _ = key
        collection = self.collection(name)  # the version live now: a swap may have happened
        filters = as_filter(json.loads(filters_json))  # validated at the edge: cheap again
        most = max(job.wanted for job in jobs)
        missing: list[int] = []
        with self.metrics.stage("search"):
            try:
                if isinstance(collection, ShardedCollection):
                    # The shards send the items along: hydrating needs no second trip.
                    sharded = collection.nearest_items(queries, most, filters=filters)
                    scores, ids, missing = sharded.scores, sharded.ids, sharded.missing
                else:
                    scores, ids = collection.nearest(queries, most, filters=filters)
            except FilterError as error:  # a filter the store refuses
                raise InvalidInputError(str(error)) from None
        for row, job in enumerate(jobs):
            _drop_unwanted(scores[row], ids[row], job)
        with self.metrics.stage("hydrate"):
            if isinstance(collection, ShardedCollection):
                hits, lost = collection.hydrate_partial(scores, ids, most, known=sharded.items)
                missing = sorted({*missing, *lost})
            else:
                hits = collection.hydrate(scores, ids, most)
        rows = []
        for found, job in zip(hits, jobs, strict=True):
            if job.sort is not None:
                with self.metrics.stage("sort"):
                    found = sort_hits(found, job.sort)
            rows.append(found[: job.wanted])
        return collection, rows, tuple(missing)


def _drop_unwanted(scores: np.ndarray, ids: np.ndarray, job: _Job) -> None:
    """Mark (id -1, in place) what one query must not get back, so it is never hydrated: the
    excluded item, hits below its ``min_score``, and what lies beyond its own ``wanted`` (its
    batch-mates may have asked for more)."""
    ids[job.wanted :] = -1
    if job.exclude is not None:
        ids[ids == job.exclude] = -1
    if job.min_score is not None:
        # In float64: float32 would round the threshold, and keep a hit just below it.
        ids[scores.astype(np.float64) < job.min_score] = -1
