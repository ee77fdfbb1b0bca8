"""The batcher on its own: grouping by key, the wait only with company, the bounded queue, and
a shutdown that answers every query."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Hashable, Sequence

import pytest

from service.batching import Batcher
from service.errors import OverloadedError
from service.metrics import Metrics


def _batcher(
    calls: list[tuple[Hashable, list[int]]],
    *,
    company: bool = True,
    max_queue: int = 100,
    gate: threading.Event | None = None,
    inline: bool = False,
    threads: list[str] | None = None,
) -> Batcher[int, int]:
    def run(key: Hashable, payloads: Sequence[int]) -> list[int]:
        if gate is not None:
            gate.wait(10)
        if threads is not None:
            threads.append(threading.current_thread().name)
        calls.append((key, list(payloads)))
        return [p * 10 for p in payloads]

    return Batcher(
        "test",
        run,
        max_batch=4,
        max_wait_s=0.05,
        max_queue=max_queue,
        metrics=Metrics(),
        others_in_flight=lambda queued: company,
        run_lone_inline=inline,
    )


def test_queries_are_grouped_by_key_and_answered_in_order() -> None:
    calls: list[tuple[Hashable, list[int]]] = []

    async def main() -> list[int]:
        batcher = _batcher(calls)
        batcher.start()
        answers = await asyncio.gather(*(batcher.submit(i % 2, i) for i in range(8)))
        await batcher.stop()
        return list(answers)

    assert asyncio.run(main()) == [i * 10 for i in range(8)]
    assert sorted(calls) == [(0, [0, 2, 4, 6]), (1, [1, 3, 5, 7])]


def test_a_lone_query_does_not_wait() -> None:
    calls: list[tuple[Hashable, list[int]]] = []

    async def main() -> float:
        batcher = _batcher(calls, company=False)
        batcher.start()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await batcher.submit("k", 1)
        took = loop.time() - start
        await batcher.stop()
        return took

    assert asyncio.run(main()) < 0.04  # well under max_wait_s (0.05)


@pytest.mark.parametrize("inline", [True, False])
def test_a_lone_query_runs_on_the_loop_thread_only_when_asked(inline: bool) -> None:
    calls: list[tuple[Hashable, list[int]]] = []
    threads: list[str] = []

    async def main() -> tuple[int, list[int]]:
        lone = _batcher(calls, company=False, inline=inline, threads=threads)
        lone.start()
        answer = await lone.submit("k", 2)
        await lone.stop()
        crowded = _batcher(calls, company=True, inline=inline, threads=threads)
        crowded.start()
        answers = await asyncio.gather(*(crowded.submit("k", i) for i in range(3)))
        await crowded.stop()
        return answer, list(answers)

    assert asyncio.run(main()) == (20, [0, 10, 20])
    loop_thread = threading.current_thread().name  # asyncio.run's loop runs in this thread
    assert threads[0] == (loop_thread if inline else "batch-test_0")
    assert threads[1:] == ["batch-test_0"]  # company, or a batch of several: the worker


def test_a_full_queue_refuses_and_stop_answers_everyone() -> None:
    calls: list[tuple[Hashable, list[int]]] = []
    gate = threading.Event()

    async def main() -> list[object]:
        batcher = _batcher(calls, max_queue=4, gate=gate, company=False)
        batcher.start()
        running = asyncio.ensure_future(batcher.submit("k", 0))
        await asyncio.sleep(0.05)  # the first batch is now blocked in the worker
        waiting = [asyncio.ensure_future(batcher.submit("k", i)) for i in range(1, 5)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError):
            await batcher.submit("k", 99)
        stopping = asyncio.ensure_future(batcher.stop())
        await asyncio.sleep(0.05)
        gate.set()
        await stopping
        return await asyncio.gather(running, *waiting, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert all(isinstance(outcome, OverloadedError) for outcome in outcomes), outcomes
