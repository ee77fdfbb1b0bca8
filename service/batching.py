"""Cross-request dynamic batching: concurrent queries become one encoder or FAISS call.

A :class:`Batcher` owns one worker thread and one asyncio task. Queries are grouped by a key
(the modality for the encoder; the collection and filters for FAISS). The task takes the oldest
group, waits at most ``max_wait_s`` for it to fill to ``max_batch``, runs the batch function in
the worker thread, and answers each query's future. While a batch runs, new queries pile up,
so under load batches grow on their own.

The wait is only worth it when company can come: ``others_in_flight()`` says whether requests
other than those already queued are being handled (parsed, decoded, looked up in the cache).
When none are, a batch runs at once, so a lone query pays nothing for batching; with
``run_lone_inline`` it runs on the event loop's thread, sparing it the thread hop too.

The batch function may put an exception in a query's slot of its results: that query fails
with it, the others of the batch get their answers (a filter one collection refuses fails the
queries of that collection only).

The queue is bounded: a query arriving when ``max_queue`` are already waiting is refused with
:class:`~service.errors.OverloadedError` (HTTP 503 with Retry-After), never queued without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from service.errors import OverloadedError
from service.metrics import Metrics

log = logging.getLogger("cots.batching")

P = TypeVar("P")
R = TypeVar("R")

# Runs one batch: (group key, payloads) -> one result (or the exception to raise) per payload,
# in order.
BatchFunction = Callable[[Hashable, Sequence[P]], Sequence[R | BaseException]]


@dataclass
class _Group(Generic[P, R]):
    first_at: float
    entries: list[tuple[P, asyncio.Future[R]]] = field(default_factory=list)


class Batcher(Generic[P, R]):
    def __init__(
        self,
        name: str,
        run: BatchFunction[P, R],
        *,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics,
        others_in_flight: Callable[[int], bool] = lambda queued: True,
        observe_batch_size: bool = True,
        run_lone_inline: bool = False,
    ) -> None:
        self.name = name
        self.run_lone_inline = run_lone_inline
        # Off for a batch function that observes its own calls' sizes (one batch of queries
        # may become several encoder and FAISS calls).
        self.observe_batch_size = observe_batch_size
        self.others_in_flight = others_in_flight
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._groups: OrderedDict[Hashable, _Group[P, R]] = OrderedDict()
        self._pending = 0
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")
        self._task: asyncio.Task[None] | None = None
        self._running: list[asyncio.Future[R]] = []  # the futures of the batch in the worker

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batch-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Queries still waiting, and those of a batch cut short by the cancel, get an answer
        # (503) instead of hanging the shutdown.
        waiting = [future for group in self._groups.values() for _, future in group.entries]
        for future in waiting + self._running:
            if not future.done():
                future.set_exception(OverloadedError(self.name))
        self._groups.clear()
        # Off the event loop: a batch still in the worker must not block other shutdowns.
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    @property
    def pending(self) -> int:
        return self._pending

    async def submit(self, key: Hashable, payload: P) -> R:
        """The result of ``payload``, computed in a batch with others of the same ``key``."""
        if self._pending >= self.max_queue:
            self.metrics.rejected.labels(self.name).inc()
            raise OverloadedError(self.name)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(time.monotonic())
        group.entries.append((payload, future))
        self._set_pending(self._pending + 1)
        self._wake.set()
        return await future

    def _set_pending(self, value: int) -> None:
        self._pending = value
        self.metrics.queue_depth.labels(self.name).set(value)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._groups:
                self._wake.clear()
                await self._wake.wait()
                continue
            key, group = next(iter(self._groups.items()))
            if not self.others_in_flight(self._pending):
                # One turn of the event loop first: requests whose bytes have arrived but not
                # been read yet (a closed-loop client answering a whole batch at once) are
                # parsed in it and count as company. A lone query pays one loop turn.
                await asyncio.sleep(0)
            # Wait for the oldest group to fill, but never past its first query's deadline.
            while len(group.entries) < self.max_batch and self.others_in_flight(self._pending):
                left = group.first_at + self.max_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=left)
                except TimeoutError:
                    break
            batch = group.entries[: self.max_batch]
            # Alone: no request in flight but the queued ones (this batch among them).
            inline = self.run_lone_inline and len(batch) == 1
            inline = inline and not self.others_in_flight(self._pending)
            rest = group.entries[self.max_batch :]
            if rest:
                group.entries = rest
                group.first_at = time.monotonic()
                self._groups.move_to_end(key)
            else:
                del self._groups[key]
            self._set_pending(self._pending - len(batch))
            live = [(payload, future) for payload, future in batch if not future.cancelled()]
            if not live:
                continue
            if self.observe_batch_size:
                self.metrics.batch_size.labels(self.name).observe(len(live))
            payloads = [payload for payload, _ in live]
            self._running = [future for _, future in live]
            try:
                if inline:
                    # A lone query runs on the event loop's own thread: the hop to the worker
                    # and back costs 0.7-1 ms on 2 cores (issue 18), and the loop has nobody
                    # else to serve meanwhile. A query arriving during the call waits for it,
                    # as it would wait for the worker's batch.
                    results: Sequence[Any] = self.run(key, payloads)
                else:
                    results = await loop.run_in_executor(self._executor, self.run, key, payloads)
            except Exception as error:  # one bad batch fails its own queries only
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, future), result in zip(live, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
