"""The JSON search fast path answers exactly as the routed FastAPI path does.

Two real servers over the same collections, one with ``fast_search`` on (the default) and one
with it off; every request goes to both and the answers must match: status, body (less the
timing) and the headers a client acts on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.service_helpers import KEYS, SEARCH_KEY, WRITE_KEY, b64, corpus_images

SEARCH = "/v1/collections/images/search"
JSON = {"content-type": "application/json"}
UTF8 = {"content-type": "application/json; charset=utf-8"}
ACTED_ON = ("content-type", "www-authenticate", "retry-after", "allow")


@pytest.fixture(scope="module")
def servers(micro_bundle: Path, served_root: tuple[Path, Path]) -> Iterator[dict[bool, LiveServer]]:
    def settings(fast: bool) -> Settings:
        return Settings(
            bundle=micro_bundle,
            index_root=served_root[1],
            api_keys=KEYS,
            rate_limit_per_minute=0,
            fast_search=fast,
            limits={"max_body_bytes": 200_000, "max_text_chars": 200, "max_k": 50},
        )

    with live_server(settings(True)) as fast, live_server(settings(False)) as routed:
        yield {True: fast, False: routed}


def _cases(corpus: Path) -> list[tuple[str, str, dict[str, str], bytes]]:
    image = b64(corpus_images(corpus)[0])

    def body(value: Any) -> bytes:
        return json.dumps(value).encode()

    return [
        ("text", SEARCH, JSON, body({"text": "a red circle"})),
        ("paged", SEARCH, JSON, body({"text": "a red circle", "k": 3, "offset": 2})),
        ("filtered", SEARCH, JSON, body({"text": "circle", "filters": {"kind": "image"}})),
        ("charset", SEARCH, UTF8, body({"text": "x"})),
        ("image", SEARCH, JSON, body({"image": image, "k": 4})),
        ("captions", "/v1/collections/captions/search", JSON, body({"image": image})),
        ("keyed", SEARCH, {**JSON, "x-api-key": SEARCH_KEY}, body({"text": "square"})),
        ("wrong key", SEARCH, {**JSON, "x-api-key": "nope"}, body({"text": "square"})),
        ("write key", SEARCH, {**JSON, "x-api-key": WRITE_KEY}, body({"text": "square"})),
        ("no such collection", "/v1/collections/nope/search", JSON, body({"text": "x"})),
        ("bad name", "/v1/collections/-bad/search", JSON, body({"text": "x"})),
        ("k over the limit", SEARCH, JSON, body({"text": "x", "k": 51})),
        ("k zero", SEARCH, JSON, body({"text": "x", "k": 0})),
        ("text too long", SEARCH, JSON, body({"text": "x" * 201})),
        ("blank text", SEARCH, JSON, body({"text": "   "})),
        ("two queries", SEARCH, JSON, body({"text": "x", "image": image})),
        ("no query", SEARCH, JSON, body({})),
        ("unknown field", SEARCH, JSON, body({"text": "x", "unknown": 1})),
        ("short vector", SEARCH, JSON, body({"embedding": [0.1, 0.2]})),
        ("not base64", SEARCH, JSON, body({"image": "%%%"})),
        ("not an image", SEARCH, JSON, body({"image": b64(b"plain text")})),
        ("broken JSON", SEARCH, JSON, b"{]"),
        ("a list", SEARCH, JSON, b"[1, 2]"),
        ("NaN k", SEARCH, JSON, b'{"text": "x", "k": NaN}'),
        ("empty body", SEARCH, JSON, b""),
        ("plain text type", SEARCH, {"content-type": "text/plain"}, body({"text": "x"})),
        ("no type", SEARCH, {}, body({"text": "x"})),
        ("too large", SEARCH, JSON, b" " * 250_000),
    ]


def _answer(response: httpx.Response) -> tuple[int, Any, dict[str, str]]:
    try:
        content = response.json()
    except ValueError:
        content = response.text
    if isinstance(content, dict):
        content.pop("took_ms", None)
    headers = {name: response.headers[name] for name in ACTED_ON if name in response.headers}
    return response.status_code, content, headers


def test_fast_and_routed_searches_answer_alike(
    servers: dict[bool, LiveServer], served_root: tuple[Path, Path]
) -> None:
    cases = _cases(served_root[0])
    answers: dict[bool, list[tuple[int, Any, dict[str, str]]]] = {}
    for is_fast, server in servers.items():
        with server.client() as client:
            answers[is_fast] = [
                _answer(client.post(path, content=content, headers=headers))
                for _, path, headers, content in cases
            ]
    for (name, *_), fast, routed in zip(cases, answers[True], answers[False], strict=True):
        assert fast == routed, name
    statuses = {name: answer[0] for (name, *_), answer in zip(cases, answers[True], strict=True)}
    # The cases reach both the fast path's own answers and every kind of fallback.
    assert statuses["text"] == statuses["image"] == statuses["captions"] == 200
    assert statuses["wrong key"] == 401
    assert statuses["no such collection"] == 404
    assert statuses["broken JSON"] == statuses["bad name"] == statuses["k over the limit"] == 422
    assert statuses["too large"] == 413
    assert answers[True][0][1]["hits"], "the text search found nothing"


def test_fast_searches_are_counted_under_the_route_template(
    servers: dict[bool, LiveServer],
) -> None:
    def counted(text: str) -> float:
        prefix = (
            'cots_request_seconds_count{method="POST",route="/v1/collections/{name}/search",'
            'status="200"}'
        )
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line.split()[-1])
        return 0.0

    with servers[True].client() as client:
        before = counted(client.get("/metrics").text)
        for i in range(3):
            assert client.post(SEARCH, json={"text": f"counted {i}"}).status_code == 200
        assert counted(client.get("/metrics").text) == before + 3


def test_a_chunked_body_over_the_limit_is_413_on_the_fast_path(
    servers: dict[bool, LiveServer],
) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"text": "'
        for _ in range(30):
            yield b"y" * 10_000
        yield b'"}'

    with servers[True].client() as client:
        response = client.post(SEARCH, content=chunks(), headers=JSON)
    assert response.status_code == 413, response.text
    assert "200,000 bytes" in response.json()["error"]["message"]
