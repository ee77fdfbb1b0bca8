"""``AsyncClient``: the API over one ``httpx.AsyncClient``, for asyncio programs (a web
service calling search, say): the methods of ``Client``, awaited. Every method is one call of
``cots.client.calls`` sent through ``_send``, which retries as ``RetryPolicy`` says and raises
the errors of ``cots.client.errors``."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self

import httpx

from cots.client import calls
from cots.client.base import (
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    client_headers,
    normalise_url,
    parse,
    request_options,
)
from cots.client.calls import JOB_DONE, Call, Filters, ImageInput, Model
from cots.client.errors import ApiError, ConnectionFailedError, JobFailedError, JobTimeoutError
from cots.client.retrying import RetryPolicy
from wire.schemas import (
    CollectionInfo,
    CollectionList,
    EmbedResponse,
    JobInfo,
    NewItem,
    Readiness,
    SearchHit,
    SearchResponse,
)

log = logging.getLogger("cots.client")


class AsyncClient:
    """A COTS Search server at ``url``. ``api_key`` goes in ``X-API-Key`` on every request
    (writes need scope ``write``, re-index and compaction ``admin``)."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = normalise_url(url)
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=client_headers(api_key),
            timeout=timeout_s,
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call[Model]) -> Model:
        attempt = 1
        while True:
            try:
                response = await self._http.request(call.method, call.path, **request_options(call))  # type: ignore[arg-type]
                return parse(call, response)
            except (ApiError, httpx.TransportError) as error:
                wait = self.retry.wait_s(attempt, error)
                if wait is None:
                    if isinstance(error, httpx.TransportError):
                        raise ConnectionFailedError(f"{self.url}: {error}") from error
                    raise
                log.info(
                    "%s %s: %s; try %d in %.1f s", call.method, call.path, error, attempt + 1, wait
                )
                await asyncio.sleep(wait)
                attempt += 1

    # ---- search and embeddings -----------------------------------------------------------

    async def search(
        self,
        collection: str,
        text: str | None = None,
        *,
        image: ImageInput | None = None,
        image_url: str | None = None,
        embedding: Sequence[float] | None = None,
        similar_to: int | None = None,
        k: int = 10,
        offset: int = 0,
        filters: Filters | None = None,
        min_score: float | None = None,
        sort: str | None = None,
        complete: bool = False,
    ) -> SearchResponse:
        """One page of hits for exactly one of ``text``, ``image`` (bytes or a path),
        ``image_url``, ``embedding`` or ``similar_to`` (an item id: items like it, itself left
        out). ``min_score``: no hits below it; ``sort``: a metadata field (``-taken``
        descending) ordering the hits at or above ``min_score``, which it needs. ``complete``:
        a sharded collection missing a shard answers 503 (retried, then raised) instead of a
        page with ``partial`` set."""
        return await self._send(
            calls.search(
                collection,
                text,
                image=image,
                image_url=image_url,
                embedding=embedding,
                similar_to=similar_to,
                k=k,
                offset=offset,
                filters=filters,
                min_score=min_score,
                sort=sort,
                complete=complete,
            )
        )

    async def pages(
        self,
        collection: str,
        text: str | None = None,
        *,
        image: ImageInput | None = None,
        embedding: Sequence[float] | None = None,
        similar_to: int | None = None,
        k: int = 10,
        filters: Filters | None = None,
        min_score: float | None = None,
        sort: str | None = None,
        max_pages: int | None = None,
    ) -> AsyncIterator[SearchResponse]:
        """Page after page of the same query, following ``next_offset`` to the last."""
        offset: int | None = 0
        served = 0
        while offset is not None and (max_pages is None or served < max_pages):
            page = await self.search(
                collection,
                text,
                image=image,
                embedding=embedding,
                similar_to=similar_to,
                k=k,
                offset=offset,
                filters=filters,
                min_score=min_score,
                sort=sort,
            )
            served += 1
            yield page
            offset = page.next_offset

    async def embed_texts(self, texts: Sequence[str]) -> EmbedResponse:
        return await self._send(calls.embed_texts(texts))

    async def embed_images(self, images: Sequence[ImageInput]) -> EmbedResponse:
        return await self._send(calls.embed_images(images))

    # ---- collections and items -----------------------------------------------------------

    async def collections(self) -> CollectionList:
        return await self._send(calls.list_collections())

    async def collection(self, name: str) -> CollectionInfo:
        return await self._send(calls.get_collection(name))

    async def item(self, collection: str, item_id: int) -> SearchHit:
        return await self._send(calls.get_item(collection, item_id))

    async def add_items(
        self, collection: str, items: Sequence[NewItem | Mapping[str, Any]]
    ) -> JobInfo:
        """Add items (``NewItem``: a base64 image or a path under the server's data root);
        returns the job, which ``wait`` follows to its end."""
        return await self._send(calls.add_items(collection, items))

    async def add_images(
        self,
        collection: str,
        images: Sequence[ImageInput],
        captions: Sequence[str | None] | None = None,
    ) -> JobInfo:
        """Add images from bytes or local files (uploaded); ``captions`` pairs with them."""
        return await self._send(calls.add_images(collection, images, captions))

    async def remove_items(
        self, collection: str, ids: Sequence[int] = (), filters: Filters | None = None
    ) -> JobInfo:
        return await self._send(calls.remove_items(collection, ids, filters))

    async def reindex(
        self,
        collection: str,
        corpus: str | None = None,
        factory: str | None = None,
        split: str | None = None,
    ) -> JobInfo:
        return await self._send(calls.reindex(collection, corpus, factory, split))

    async def compact(self, collection: str, full: bool = False, **policy: float | int) -> JobInfo:
        return await self._send(calls.compact(collection, full, **policy))

    # ---- jobs and health -----------------------------------------------------------------

    async def job(self, job_id: str) -> JobInfo:
        return await self._send(calls.get_job(job_id))

    async def wait(
        self, job: JobInfo | str, timeout_s: float = 600.0, poll_s: float = 0.5
    ) -> JobInfo:
        """Poll a job until it ends; its last status when it finished, ``JobFailedError`` when it
        did not, ``JobTimeoutError`` when ``timeout_s`` passed first."""
        job_id = job if isinstance(job, str) else job.id
        started = time.monotonic()
        while True:
            status = await self.job(job_id)
            if status.status in JOB_DONE:
                if status.status != "finished":
                    raise JobFailedError(status)
                return status
            if time.monotonic() - started > timeout_s:
                raise JobTimeoutError(status, time.monotonic() - started)
            await asyncio.sleep(poll_s)

    async def ready(self) -> Readiness:
        """``/readyz``'s answer, unready (a 503) included."""
        return await self._send(calls.readiness())
