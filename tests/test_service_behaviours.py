"""Access rules of a live server that no other test proved (issue 21, item 7): what
``search_requires_key`` guards, and image URLs fetched from an allowed host only as the rules
say (no redirects, a size cap, upstream errors named, http(s) only)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.service_helpers import (
    KEYS,
    SEARCH_KEY,
    WRITE_KEY,
    assert_error,
    b64,
    corpus_images,
)
from tests.tools import free_port

SEARCH = "/v1/collections/images/search"


def _ids(answer: dict[str, Any]) -> list[int]:
    return [hit["id"] for hit in answer["hits"]]


# a. search_requires_key ---------------------------------------------------------------------


def _read_requests(png: bytes) -> list[tuple[str, str, dict[str, Any]]]:
    """Every route that reads collections or the model (scope "search"): (method, path,
    httpx options)."""
    text = {"text": "a red circle", "k": 3}
    return [
        ("POST", SEARCH, {"json": text}),
        ("POST", f"{SEARCH}/upload", {"files": {"image": ("q.png", png, "image/png")}}),
        ("GET", "/v1/collections", {}),
        ("GET", "/v1/collections/images", {}),
        ("GET", "/v1/collections/images/items/0", {}),
        ("GET", "/v1/collections/images/items/0/media", {}),
        ("POST", "/v1/embed/texts", {"json": {"texts": ["a red circle"]}}),
        ("POST", "/v1/embed/images", {"json": {"images": [b64(png)]}}),
        ("POST", "/v1/embed/images/upload", {"files": {"images": ("q.png", png, "image/png")}}),
        ("POST", "/knn-service", {"json": {"text": "a red circle", "indice_name": "images"}}),
        ("GET", "/indices-list", {}),
        ("POST", "/metadata", {"json": {"ids": [0], "indice_name": "images"}}),
    ]


@pytest.mark.parametrize(("required", "fast_search"), [(True, True), (True, False), (False, True)])
def test_search_requires_key_guards_every_read_route_and_nothing_else(
    micro_bundle: Path, served_root: tuple[Path, Path], required: bool, fast_search: bool
) -> None:
    settings = Settings(
        bundle=micro_bundle,
        index_root=served_root[1],
        api_keys=KEYS,
        rate_limit_per_minute=0,
        search_requires_key=required,
        fast_search=fast_search,  # off: the JSON search takes FastAPI's route, not the fast path
    )
    png = corpus_images(served_root[0])[0].read_bytes()
    with live_server(settings) as server, server.client() as client:
        for method, path, options in _read_requests(png):
            anonymous = client.request(method, path, **options)
            if required:
                assert_error(anonymous, 401, "api key", "scope 'search'")
                assert anonymous.headers["www-authenticate"] == "ApiKey"
            else:
                assert anonymous.status_code == 200, (path, anonymous.text)
            # A key that is sent must be valid, whatever the setting.
            wrong = client.request(method, path, headers={"X-API-Key": "wrong"}, **options)
            assert_error(wrong, 401, "invalid API key")
            # Every valid key may search: a search-scoped one, and a write key too.
            for headers in (
                {"X-API-Key": SEARCH_KEY},
                {"Authorization": f"Bearer {SEARCH_KEY}"},
                {"X-API-Key": WRITE_KEY},
            ):
                answered = client.request(method, path, headers=headers, **options)
                assert answered.status_code == 200, (path, headers, answered.text)
        # Probes and scrapers never need a key.
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200, path


# b. image_url fetched from an allowed host --------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    length: bool = True  # send Content-Length; without it the body ends when the socket closes


class Upstream:
    """A real HTTP server on 127.0.0.1 that answers each path as told, and records the paths
    it was asked for."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {}
        self.asked: list[str] = []
        answers, asked = self.answers, self.asked

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                asked.append(self.path)
                answer = answers.get(self.path, Answer(404, b"no such thing"))
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if answer.length:
                    self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                for start in range(0, len(answer.body), 8192):  # streamed in pieces
                    self.wfile.write(answer.body[start : start + 8192])
                    self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Upstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


FETCH_LIMIT = 64_000


def _noise_png(side: int) -> bytes:
    """A valid PNG that compresses badly: side x side random pixels (~3 side^2 bytes)."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def fetching(
    micro_bundle: Path, served_root: tuple[Path, Path]
) -> Iterator[tuple[LiveServer, Upstream, bytes]]:
    """(a server that may fetch from 127.0.0.1, the upstream, the image it serves)."""
    image = corpus_images(served_root[0])[4].read_bytes()
    big = _noise_png(256)
    assert len(big) > FETCH_LIMIT  # a valid image the server would take but for its size
    with Upstream() as upstream:
        upstream.answers |= {
            "/image.png": Answer(200, image, {"Content-Type": "image/png"}),
            "/moved.png": Answer(302, b"", {"Location": f"{upstream.url}/image.png"}),
            "/big.png": Answer(200, big, {"Content-Type": "image/png"}),
            "/big-unsized.png": Answer(200, big, {"Content-Type": "image/png"}, length=False),
            "/broken.png": Answer(500, b"upstream failure"),
        }
        settings = Settings(
            bundle=micro_bundle,
            index_root=served_root[1],
            rate_limit_per_minute=0,
            url_fetch_allowlist=["127.0.0.1"],
            limits={"max_body_bytes": FETCH_LIMIT},
        )
        with live_server(settings) as server:
            yield server, upstream, image


def test_an_allowed_image_url_is_fetched_and_searched_as_the_image_itself(
    fetching: tuple[LiveServer, Upstream, bytes],
) -> None:
    server, upstream, image = fetching
    upstream.asked.clear()
    with server.client() as client:
        fetched = client.post(SEARCH, json={"image_url": f"{upstream.url}/image.png", "k": 5})
        sent = client.post(SEARCH, json={"image": b64(image), "k": 5})
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["query"] == "image"
    assert _ids(fetched.json()) == _ids(sent.json())
    assert fetched.json()["hits"][0]["score"] > 0.999  # the corpus holds this very image
    assert upstream.asked == ["/image.png"]


def test_a_redirect_is_not_followed(fetching: tuple[LiveServer, Upstream, bytes]) -> None:
    server, upstream, _ = fetching
    upstream.asked.clear()
    with server.client() as client:
        moved = client.post(SEARCH, json={"image_url": f"{upstream.url}/moved.png"})
    assert_error(moved, 400, "answered 302")
    assert upstream.asked == ["/moved.png"]  # never the target it pointed to


@pytest.mark.parametrize("path", ["/big.png", "/big-unsized.png"])
def test_an_image_over_the_size_cap_is_413(
    fetching: tuple[LiveServer, Upstream, bytes], path: str
) -> None:
    server, upstream, _ = fetching
    with server.client() as client:
        response = client.post(SEARCH, json={"image_url": upstream.url + path})
    assert_error(response, 413, f"over {FETCH_LIMIT:,} bytes")


def test_an_upstream_that_fails_is_a_400_that_says_how(
    fetching: tuple[LiveServer, Upstream, bytes],
) -> None:
    server, upstream, _ = fetching
    nobody = f"http://127.0.0.1:{free_port()}/image.png"  # nothing listens there
    with server.client() as client:
        for path, status in (("/missing.png", 404), ("/broken.png", 500)):
            response = client.post(SEARCH, json={"image_url": upstream.url + path})
            assert_error(response, 400, f"answered {status}", path)
        assert_error(client.post(SEARCH, json={"image_url": nobody}), 400, "cannot fetch")


def test_only_http_urls_of_allowed_hosts_are_fetched(
    fetching: tuple[LiveServer, Upstream, bytes],
) -> None:
    server, upstream, _ = fetching
    port = upstream.url.rsplit(":", 1)[1]
    upstream.asked.clear()
    with server.client() as client:
        for url in (f"ftp://127.0.0.1:{port}/image.png", "file:///etc/passwd", "data:,x"):
            assert_error(client.post(SEARCH, json={"image_url": url}), 400, "http(s) URL")
        for url in (
            f"http://localhost:{port}/image.png",  # the same server, by a name not allowed
            f"http://127.0.0.1@localhost:{port}/image.png",  # 127.0.0.1 only as a user name
        ):
            assert_error(
                client.post(SEARCH, json={"image_url": url}), 403, "'localhost'", "allow-list"
            )
    assert upstream.asked == []
