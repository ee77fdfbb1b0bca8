"""The search API through real HTTP: every query kind, paging, filters, embeddings, the
collection routes, and cross-request batching."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.collection import Collection
from runtime.encoder import Encoder
from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.service_helpers import b64, corpus_images


@pytest.fixture(scope="module")
def server(micro_bundle: Path, served_root: tuple[Path, Path]) -> Iterator[LiveServer]:
    settings = Settings(
        bundle=micro_bundle,
        index_root=served_root[1],
        rate_limit_per_minute=0,
        batch={"max_wait_ms": 20, "max_batch": 64},
    )
    with live_server(settings) as running:
        yield running


def _ids(response: dict) -> list[int]:
    return [hit["id"] for hit in response["hits"]]


def test_text_search_pages_and_filters(server: LiveServer) -> None:
    with server.client() as client:
        full = client.post("/v1/collections/images/search", json={"text": "a red circle", "k": 10})
        assert full.status_code == 200, full.text
        body = full.json()
        assert body["query"] == "text"
        assert body["version"] == 1
        assert len(body["hits"]) == 10
        scores = [hit["score"] for hit in body["hits"]]
        assert scores == sorted(scores, reverse=True)
        hit = body["hits"][0]
        assert hit["kind"] == "image"
        assert hit["uri"].endswith(".png")
        assert hit["caption"]
        assert hit["metadata"]["split"] in {"train", "val", "test", "heldout"}
        page = client.post(
            "/v1/collections/images/search", json={"text": "a red circle", "k": 5, "offset": 5}
        ).json()
        assert _ids(page) == _ids(body)[5:10]
        assert page["next_offset"] == 10
        assert page["cached"] is True
        last = client.post(
            "/v1/collections/images/search", json={"text": "a red circle", "k": 10, "offset": 45}
        ).json()
        assert len(last["hits"]) == 3
        assert last["next_offset"] is None
        train = client.post(
            "/v1/collections/images/search",
            json={"text": "a red circle", "k": 48, "filters": {"split": "train"}},
        ).json()
        assert train["hits"]
        assert all(h["metadata"]["split"] == "train" for h in train["hits"])


def test_the_filter_language_over_http(server: LiveServer) -> None:
    def hits(filters: dict[str, object], k: int = 48) -> list[dict[str, object]]:
        response = client.post(
            "/v1/collections/images/search",
            json={"text": "a red circle", "k": k, "filters": filters},
        )
        assert response.status_code == 200, response.text
        return list(response.json()["hits"])

    with server.client() as client:
        every = hits({})
        splits = {h["metadata"]["split"] for h in every}  # type: ignore[index]
        assert len(splits) > 1
        one_of = hits({"split": {"in": ["val", "test"]}})
        assert one_of
        assert {h["metadata"]["split"] for h in one_of} <= {"val", "test"}  # type: ignore[index]
        either = hits({"any_of": [{"split": "val"}, {"split": "test"}]})
        assert [h["id"] for h in either] == [h["id"] for h in one_of]
        others = hits({"split": {"ne": "train"}})
        assert all(h["metadata"]["split"] != "train" for h in others)  # type: ignore[index]
        assert hits({"split": {"exists": False}}) == []
        assert hits({"nope": {"exists": False}}) == every
        # Exactly the matching items, best first, as the unfiltered ranking orders them.
        matching = [h["id"] for h in every if h["metadata"]["split"] in {"val", "test"}]  # type: ignore[index]
        assert [h["id"] for h in one_of][: len(matching)] == matching[: len(one_of)]
        page = client.post(
            "/v1/collections/images/search/upload",
            data={"filters": json.dumps({"split": {"ne": "train"}}), "k": "5"},
            files={"image": ("q.png", _red_png(), "image/png")},
        )
        assert page.status_code == 200, page.text
        assert all(h["metadata"]["split"] != "train" for h in page.json()["hits"])


def _red_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_text_to_video_hits_carry_their_moments(server: LiveServer) -> None:
    with server.client() as client:
        body = client.post(
            "/v1/collections/videos/search", json={"text": "a circle moves", "k": 20}
        ).json()
    kinds = {hit["kind"] for hit in body["hits"]}
    assert kinds == {"video", "segment"}
    for hit in body["hits"]:
        assert hit["uri"].endswith(".mp4")
        assert hit["start_s"] is not None
        assert hit["end_s"] > hit["start_s"]


def test_image_queries_find_captions_and_the_same_image(
    server: LiveServer, served_root: tuple[Path, Path]
) -> None:
    image = corpus_images(served_root[0])[7]
    with server.client() as client:
        similar = client.post(
            "/v1/collections/images/search", json={"image": b64(image), "k": 3}
        ).json()
        assert similar["query"] == "image"
        assert similar["hits"][0]["uri"] == str(image)
        assert similar["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        uploaded = client.post(
            "/v1/collections/images/search/upload",
            files={"image": (image.name, image.read_bytes(), "image/png")},
            data={"k": "3"},
        ).json()
        assert _ids(uploaded) == _ids(similar)
        data_url = "data:image/png;base64," + b64(image)
        captions = client.post(
            "/v1/collections/captions/search", json={"image": data_url, "k": 5}
        ).json()
        assert [h["kind"] for h in captions["hits"]] == ["caption"] * 5
        assert all(h["caption"] for h in captions["hits"])


def test_embedding_queries_equal_text_queries(server: LiveServer, micro_bundle: Path) -> None:
    with server.client() as client:
        embedded = client.post("/v1/embed/texts", json={"texts": ["a blue square", "a star"]})
        assert embedded.status_code == 200, embedded.text
        vectors = np.asarray(embedded.json()["embeddings"], dtype=np.float32)
        expected = Encoder(micro_bundle).encode_texts(["a blue square", "a star"])
        np.testing.assert_allclose(vectors, expected, atol=1e-5)
        by_text = client.post(
            "/v1/collections/captions/search", json={"text": "a blue square", "k": 5}
        ).json()
        by_vector = client.post(
            "/v1/collections/captions/search",
            json={"embedding": vectors[0].tolist(), "k": 5},
        ).json()
        assert by_vector["query"] == "embedding"
        assert _ids(by_vector) == _ids(by_text)


def test_embed_images_json_and_upload_agree(
    server: LiveServer, served_root: tuple[Path, Path], micro_bundle: Path
) -> None:
    paths = corpus_images(served_root[0])[:3]
    with server.client() as client:
        as_json = client.post("/v1/embed/images", json={"images": [b64(p) for p in paths]})
        as_files = client.post(
            "/v1/embed/images/upload",
            files=[("images", (p.name, p.read_bytes(), "image/png")) for p in paths],
        )
    assert as_json.status_code == as_files.status_code == 200, (as_json.text, as_files.text)
    a = np.asarray(as_json.json()["embeddings"])
    b = np.asarray(as_files.json()["embeddings"])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, Encoder(micro_bundle).encode_images(paths), atol=1e-5)
    assert as_json.json()["dim"] == a.shape[1]


def test_collection_routes(server: LiveServer, micro_bundle: Path) -> None:
    with server.client() as client:
        listed = client.get("/v1/collections").json()
        names = {c["name"]: c for c in listed["collections"]}
        assert set(names) == {"images", "captions", "videos"}
        assert listed["unavailable"] == {}
        images = client.get("/v1/collections/images").json()
        assert images == names["images"]
        assert images["count"] == images["live"] == 48
        assert images["kind"] == "image"
        assert images["version"] == 1
        assert images["versions"] == [1]
        assert images["index_type"]
        assert 0 <= images["recall_at_10"] <= 1
        assert images["model_bundle_id"] == client.get("/readyz").json()["model_bundle_id"]
        item = client.get("/v1/collections/images/items/3").json()
        assert item["id"] == 3
        assert item["kind"] == "image"
        media = client.get(item["media_url"])
        assert media.status_code == 200
        assert media.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(media.content)).size == (32, 32)
        video = client.post("/v1/collections/videos/search", json={"text": "x", "k": 1}).json()
        clip = client.get(video["hits"][0]["media_url"])
        assert clip.status_code == 200
        assert clip.headers["content-type"] == "video/mp4"


def test_health_and_metrics(server: LiveServer) -> None:
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok", "replica": socket.gethostname()}
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready"
        assert ready["redis"] == "disabled"
        assert ready["collections"] == {"images": 1, "captions": 1, "videos": 1}
        client.post("/v1/collections/images/search", json={"text": "metrics please", "k": 2})
        text = client.get("/metrics").text
    for needle in (
        'cots_request_seconds_count{method="POST",route="/v1/collections/{name}/search"',
        'cots_stage_seconds_count{stage="tokenise"}',
        'cots_stage_seconds_count{stage="encode"}',
        'cots_stage_seconds_count{stage="search"}',
        'cots_stage_seconds_count{stage="hydrate"}',
        'cots_batch_size_count{batcher="encode"}',
        'cots_queue_depth{batcher="search"}',
        'cots_cache_total{backend="local",result="miss"}',
        'cots_index_version{collection="images"} 1.0',
    ):
        assert needle in text, needle


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def _answers_in_process(
    bundle: Path, index_root: Path, texts: list[str], k: int
) -> dict[str, list[tuple[int, float]]]:
    """(id, score) of the top ``k`` images of each text, found without the server: each text
    encoded alone by the bundle's Encoder and searched alone in the collection, so neither the
    server's batching nor its embedding cache has a say."""
    encoder = Encoder(bundle)
    answers = {}
    with Collection.open(index_root, "images") as images:
        for text in texts:
            [hits] = images.search(encoder.encode_texts([text]), k)
            answers[text] = [(hit.id, hit.score) for hit in hits]
    return answers


def test_concurrent_queries_are_batched_and_answered_separately(
    server: LiveServer, micro_bundle: Path, served_root: tuple[Path, Path]
) -> None:
    """Queries sent at once share encoder calls, and each still gets the answer of its own
    text: every answer equals that text encoded and searched alone, in this process."""
    texts = [
        f"a {colour} {shape} number {i}"
        for i, (colour, shape) in enumerate(
            [(c, s) for c in ("red", "green", "blue", "white") for s in ("circle", "star", "heart")]
        )
    ] * 2
    texts = [f"{text} {i}" for i, text in enumerate(texts)]  # all distinct: no cache hits
    k = 5
    expected = _answers_in_process(
        micro_bundle, served_root[1], texts[:4] + [f"again {t}" for t in texts], k
    )
    # A query answered with a neighbour's embedding must show: no two texts share an answer.
    assert len({tuple(answer) for answer in expected.values()}) == len(expected)

    def check(text: str, answer: list[tuple[int, float]]) -> None:
        want = expected[text]
        assert [i for i, _ in answer] == [i for i, _ in want], text
        np.testing.assert_allclose([s for _, s in answer], [s for _, s in want], atol=1e-5)

    with server.client() as client:

        def ask(text: str) -> tuple[str, list[tuple[int, float]]]:
            response = client.post("/v1/collections/images/search", json={"text": text, "k": k})
            assert response.status_code == 200, response.text
            return text, [(hit["id"], hit["score"]) for hit in response.json()["hits"]]

        for text in texts[:4]:  # single queries work too
            check(*ask(text))
        before = client.get("/metrics").text
        with ThreadPoolExecutor(len(texts)) as pool:
            answers = dict(pool.map(ask, [f"again {t}" for t in texts]))
        after = client.get("/metrics").text
    for text, answer in answers.items():  # each query got its own answer, not a neighbour's
        check(text, answer)
    calls = _metric(after, 'cots_batch_size_count{batcher="encode"}') - _metric(
        before, 'cots_batch_size_count{batcher="encode"}'
    )
    queries = _metric(after, 'cots_batch_size_sum{batcher="encode"}') - _metric(
        before, 'cots_batch_size_sum{batcher="encode"}'
    )
    assert queries == len(texts)
    assert calls < len(texts) / 2, f"{len(texts)} concurrent queries took {calls} encoder calls"


def test_a_lone_query_is_not_delayed_by_the_batcher(
    micro_bundle: Path, served_root: tuple[Path, Path]
) -> None:
    """With a batch wait of a whole second, queries sent one after another are still answered
    at once: the batcher waits only while other requests are in flight. (Each must come back
    well inside the wait it would otherwise have paid; the margin is the wait itself, not a
    speed goal.)"""
    settings = Settings(
        bundle=micro_bundle,
        index_root=served_root[1],
        rate_limit_per_minute=0,
        batch={"max_wait_ms": 1000, "max_batch": 64},
    )
    with live_server(settings) as running, running.client() as client:
        client.post("/v1/collections/images/search", json={"text": "warm up", "k": 5})
        before = client.get("/metrics").text
        took = []
        for i in range(5):
            start = time.perf_counter()
            response = client.post(
                "/v1/collections/images/search", json={"text": f"a lone red circle {i}", "k": 5}
            )
            took.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
            assert response.json()["cached"] is False
        after = client.get("/metrics").text
    assert max(took) < 0.5, f"lone queries took {took} s against a 1 s batch wait"
    encoded = _metric(after, 'cots_batch_size_sum{batcher="encode"}') - _metric(
        before, 'cots_batch_size_sum{batcher="encode"}'
    )
    calls = _metric(after, 'cots_batch_size_count{batcher="encode"}') - _metric(
        before, 'cots_batch_size_count{batcher="encode"}'
    )
    assert encoded == calls == 5  # five batches of one: nothing waited for company
