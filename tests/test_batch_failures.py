"""A failing batch fails only its own queries (issue 21, item 7): through a live server (an
encoder or FAISS failure inside one batch, and a failed batch with others queued behind it),
and in the batcher itself (a batch function that raises)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.batching import Batcher
from service.metrics import Metrics
from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.service_helpers import assert_error, b64, corpus_images
from tests.tools import wait_until

SEARCH = "/v1/collections/images/search"


def _ids(answer: dict[str, Any]) -> list[int]:
    return [hit["id"] for hit in answer["hits"]]


# i. A failing batch fails only its own queries ----------------------------------------------


class FaultyTokenizer:
    """The server's tokenizer, except that a batch holding the word "hold" waits in the worker
    until ``release`` is set, and one holding "boom" fails."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, texts: list[str]) -> Any:
        if any("hold" in text for text in texts):
            self.held.set()
            self.release.wait(30)
        if any("boom" in text for text in texts):
            raise RuntimeError("the tokenizer failed on this batch")
        return self.real(texts)


@pytest.fixture(scope="module")
def batching(micro_bundle: Path, served_root: tuple[Path, Path]) -> Iterator[LiveServer]:
    settings = Settings(
        bundle=micro_bundle,
        index_root=served_root[1],
        rate_limit_per_minute=0,
        local_cache_entries=0,  # no cache: every text query is encoded in its batch
        # Never inline: the held batch must wait in the worker, not on the event loop.
        batch={"max_wait_ms": 50, "max_batch": 64, "lone_inline": False},
    )
    with live_server(settings) as server:
        yield server


Send = Callable[[str, dict[str, Any]], "Future[httpx.Response]"]


@contextmanager
def _held_batch(server: LiveServer, first: str) -> Iterator[tuple[FaultyTokenizer, Send, Any]]:
    """A faulty tokenizer in ``server`` and a search for ``first`` (which holds "hold") sent
    and held in the worker: (the tokenizer, a function that sends a search in the background,
    the first search's future). The caller queues others behind it, then sets ``release``."""
    encoder = server.state.encoder
    real = encoder.tokenizer
    fault = FaultyTokenizer(real)
    encoder.tokenizer = fault
    try:
        with server.client() as client, ThreadPoolExecutor(16) as pool:

            def send(path: str, body: dict[str, Any]) -> Future[httpx.Response]:
                return pool.submit(client.post, path, json=body)

            held = send(SEARCH, {"text": first, "k": 5})
            assert fault.held.wait(10), "the first batch never reached the tokenizer"
            yield fault, send, held
            fault.release.set()
    finally:
        fault.release.set()
        encoder.tokenizer = real


def _queued(server: LiveServer, count: int) -> None:
    """Wait until ``count`` queries wait in the search batcher (its next batch)."""
    batcher = server.state.engine.search_batcher
    wait_until(
        lambda: batcher.pending == count, 10, f"{count} queries never queued", interval_s=0.01
    )


def _answered(future: Future[httpx.Response], want: list[int], what: str) -> None:
    response = future.result(timeout=30)
    assert response.status_code == 200, (what, response.text)
    assert _ids(response.json()) == want, what


def test_a_failing_batch_fails_its_own_queries_and_the_next_batch_answers(
    batching: LiveServer,
) -> None:
    colours = ("red", "green", "blue", "pink")
    texts = [f"a {colour} shape, query {i}" for i, colour in enumerate(colours)]
    expected = {text: _ids(batching.search("images", text=text, k=5)) for text in texts}
    with _held_batch(batching, "hold boom") as (fault, send, failing):
        # The held batch fails once released; these wait behind it as the next batch.
        answers = {text: send(SEARCH, {"text": text, "k": 5}) for text in texts}
        _queued(batching, len(texts))
        fault.release.set()
        assert_error(failing.result(timeout=30), 500, "internal error")
        for text, answer in answers.items():
            _answered(answer, expected[text], text)


def test_a_failure_in_a_batch_fails_only_the_queries_it_concerns(
    batching: LiveServer, served_root: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = b64(corpus_images(served_root[0])[7])
    with batching.client() as client:
        embedded = client.post("/v1/embed/texts", json={"texts": ["a red star"]}).json()
    vector = embedded["embeddings"][0]
    fine = {  # name: (collection, query)
        "image": ("images", {"image": image, "k": 5}),
        "embedding": ("images", {"embedding": vector, "k": 5}),
        "videos": ("videos", {"embedding": vector, "k": 5}),
    }
    expected = {name: _ids(batching.search(c, **body)) for name, (c, body) in fine.items()}

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("FAISS failed on this collection")

    monkeypatch.setattr(batching.state.registry.get("captions"), "nearest", broken)
    with _held_batch(batching, "hold") as (fault, send, held):
        # One batch: a text whose encoding fails, a search of a collection that fails, and
        # queries that need neither that encoding nor that collection.
        doomed = [
            send(SEARCH, {"text": "boom", "k": 5}),
            send("/v1/collections/captions/search", {"embedding": vector, "k": 5}),
        ]
        answers = {
            name: send(f"/v1/collections/{c}/search", body) for name, (c, body) in fine.items()
        }
        _queued(batching, len(doomed) + len(answers))
        fault.release.set()
        assert held.result(timeout=30).status_code == 200
        for name, answer in answers.items():
            _answered(answer, expected[name], name)
        for future in doomed:
            assert_error(future.result(timeout=30), 500, "internal error")


def test_a_batch_whose_function_raises_fails_its_own_queries_only() -> None:
    """The batcher's side: a batch function that raises (rather than answering each query)
    fails the queries of that batch; those queued meanwhile, and later ones, are answered."""
    entered, gate = threading.Event(), threading.Event()

    def run(key: Hashable, payloads: Sequence[int]) -> list[int]:
        if key == "bad":
            entered.set()
            gate.wait(10)
            raise RuntimeError("this batch failed")
        return [p * 10 for p in payloads]

    async def main() -> tuple[list[object], int]:
        batcher = Batcher[int, int](
            "test", run, max_batch=4, max_wait_s=0.01, max_queue=100, metrics=Metrics()
        )
        batcher.start()
        bad = [asyncio.ensure_future(batcher.submit("bad", i)) for i in range(2)]
        while not entered.is_set():  # until the bad batch waits at the gate, in the worker
            await asyncio.sleep(0.01)
        queued = [asyncio.ensure_future(batcher.submit(key, i)) for i, key in enumerate("abab")]
        await asyncio.sleep(0)
        assert batcher.pending == len(queued)
        gate.set()
        answered = asyncio.gather(*bad, *queued, return_exceptions=True)
        outcomes = await asyncio.wait_for(answered, timeout=10)
        later = await asyncio.wait_for(batcher.submit("a", 7), timeout=5)
        await batcher.stop()
        return list(outcomes), later

    outcomes, later = asyncio.run(main())
    assert [str(outcome) for outcome in outcomes[:2]] == ["this batch failed"] * 2
    assert outcomes[2:] == [0, 10, 20, 30]
    assert later == 70
