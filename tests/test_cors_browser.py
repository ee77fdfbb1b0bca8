"""Apps on another origin (issue 37, item 9): CORS with an allow-list, ``COTS_CORS_ORIGINS``.

A page served by a second local server (another port: another origin) searches the API with
``fetch`` (a text search and clip-retrieval's ``/knn-service``, with ``Content-Type: JSON`` and
``X-API-Key``, so the browser sends a preflight first) and shows the result images. In headless
Chromium (driven as ``tests/test_page_browser.py`` does) it shows them when the allow-list
names its origin, and shows none when the list is empty or names another. Then over plain
HTTP: preflights, refused origins, and the headers on the fast path's answers and errors.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser

from service.middleware import CORS_EXPOSED_HEADERS
from service.settings import Settings
from tests.chromium import TIMEOUT_MS, launched_chromium
from tests.live_server import LiveServer, live_server
from tests.service_helpers import KEYS, SEARCH_KEY
from tests.tools import free_port

QUERY = "a small red circle on a striped background"
SEARCH = "/v1/collections/images/search"
SHOWN = 4  # images each of the app's two searches shows

# The other app: plain JavaScript, nothing of the service's page. Its state says how it ended.
APP_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>another app</title></head>
<body data-state="loading">
<section id="text"></section><section id="knn"></section><p id="error"></p>
<script>
"use strict";
const api = new URLSearchParams(location.search).get("api");
const headers = {"Content-Type": "application/json", "X-API-Key": "__KEY__"};
async function post(path, body) {
  const response = await fetch(api + path, {method: "POST", headers, body: JSON.stringify(body)});
  if (!response.ok) throw new Error(`${path}: ${response.status}`);
  return response.json();
}
function show(into, urls) {
  for (const url of urls) {
    const img = document.createElement("img");
    img.src = url;
    document.getElementById(into).append(img);
  }
}
(async () => {
  try {
    const page = await post("/v1/collections/images/search", {text: "__QUERY__", k: __K__});
    show("text", page.hits.map((hit) => `${api}${hit.media_url}?w=64`));
    const knn = await post("/knn-service",
      {text: "__QUERY__", indice_name: "images", num_images: __K__});
    show("knn", knn.map((result) => result.url));
    document.body.dataset.state = "done";
  } catch (error) {
    document.getElementById("error").textContent = String(error);
    document.body.dataset.state = "failed";
  }
})();
</script></body></html>
"""
IMAGES = """() => [...document.querySelectorAll("section img")]
    .map((img) => ({section: img.parentElement.id, complete: img.complete,
                    width: img.naturalWidth}))"""


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def app_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The second origin: a plain http.server holding the other app's page."""
    folder = tmp_path_factory.mktemp("other-app")
    html = APP_HTML.replace("__KEY__", SEARCH_KEY).replace("__QUERY__", QUERY)
    (folder / "index.html").write_text(html.replace("__K__", str(SHOWN)))
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched_chromium() as launched:
        yield launched


def _settings(bundle: Path, root: Path, **fields: Any) -> Settings:
    return Settings(bundle=bundle, index_root=root, api_keys=KEYS, **fields)


def _run_app(browser: Browser, app_origin: str, api: LiveServer) -> tuple[str, str, list[Any]]:
    """(the app's final state, its error text, its images) after it ran against ``api``."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{app_origin}/index.html?api={api.url}")
        page.wait_for_function("() => document.body.dataset.state !== 'loading'")
        state = str(page.evaluate("() => document.body.dataset.state"))
        if state == "done":
            page.wait_for_function(f"() => ({IMAGES})().every((image) => image.complete)")
        return state, page.inner_text("#error"), list(page.evaluate(IMAGES))
    finally:
        context.close()


def test_a_page_on_another_origin_searches_and_shows_images_when_its_origin_is_allowed(
    browser: Browser, app_origin: str, micro_bundle: Path, served_root: tuple[Path, Path]
) -> None:
    settings = _settings(micro_bundle, served_root[1], cors_origins=[app_origin])
    with live_server(settings) as api:
        state, error, images = _run_app(browser, app_origin, api)
    assert (state, error) == ("done", "")
    assert [image["section"] for image in images] == ["text"] * SHOWN + ["knn"] * SHOWN
    assert all(image["width"] > 0 for image in images), images


@pytest.mark.parametrize("allowed", [[], ["http://127.0.0.1:1"]], ids=["no-list", "another"])
def test_the_same_page_gets_nothing_when_its_origin_is_not_allowed(
    browser: Browser,
    app_origin: str,
    micro_bundle: Path,
    served_root: tuple[Path, Path],
    allowed: list[str],
) -> None:
    settings = _settings(micro_bundle, served_root[1], cors_origins=allowed)
    with live_server(settings) as api:
        state, error, images = _run_app(browser, app_origin, api)
    assert state == "failed"
    assert "Failed to fetch" in error  # the browser refused to hand the answer over
    assert images == []


# Over plain HTTP ----------------------------------------------------------------------------

ORIGIN = "https://photos.example.com"


def _cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control-")}


def _preflight(client: httpx.Client, path: str, origin: str = ORIGIN) -> httpx.Response:
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-api-key",
        },
    )


def _assert_allowed(response: httpx.Response) -> None:
    assert response.headers["access-control-allow-origin"] == ORIGIN, response.headers
    exposed = response.headers["access-control-expose-headers"].lower()
    assert "retry-after" in exposed
    assert "Origin" in response.headers["vary"]


@pytest.fixture(scope="module")
def cors_server(micro_bundle: Path, served_root: tuple[Path, Path]) -> Iterator[LiveServer]:
    settings = _settings(
        micro_bundle,
        served_root[1],
        cors_origins=[ORIGIN],
        rate_limit_per_minute=0,
        limits={"max_body_bytes": 4096},
    )
    assert settings.fast_search  # the JSON searches below are answered by the fast path
    with live_server(settings) as running:
        yield running


@pytest.mark.parametrize("path", [SEARCH, "/knn-service", "/v1/collections/images/items/0/media"])
def test_a_preflight_from_an_allowed_origin_is_answered_200(
    cors_server: LiveServer, path: str
) -> None:
    with cors_server.client() as client:
        response = _preflight(client, path)
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "x-api-key" in response.headers["access-control-allow-headers"].lower()
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


def test_another_origin_gets_no_cors_headers_at_all(cors_server: LiveServer) -> None:
    with cors_server.client() as client:
        preflight = _preflight(client, SEARCH, origin="https://evil.example")
        search = client.post(
            SEARCH, json={"text": QUERY, "k": 2}, headers={"Origin": "https://evil.example"}
        )
    assert preflight.status_code == 403
    assert "https://evil.example" in preflight.json()["error"]["message"]
    assert _cors_headers(preflight) == {}
    assert search.status_code == 200  # a server-side caller with that header is not refused
    assert _cors_headers(search) == {}
    assert "Origin" in search.headers["vary"]  # so no cache hands it to an allowed origin


def test_answers_and_errors_carry_the_headers(cors_server: LiveServer) -> None:
    origin = {"Origin": ORIGIN}
    with cors_server.client(headers=origin) as client:
        answers = {
            "fast-path search": client.post(SEARCH, json={"text": QUERY, "k": 2}),
            "knn": client.post("/knn-service", json={"text": QUERY, "indice_name": "images"}),
            "thumbnail": client.get("/v1/collections/images/items/0/media", params={"w": 64}),
            "401": client.post(SEARCH, json={"text": QUERY}, headers={"X-API-Key": "wrong"}),
            "422": client.post(SEARCH, json={"text": QUERY, "k": 0}),
            "404": client.post("/v1/collections/nothing/search", json={"text": QUERY}),
            "413": client.post(SEARCH, content=b"x" * 5000, headers={"Content-Type": "text/plain"}),
        }
    for what, response in answers.items():
        expected = int(what) if what.isdigit() else 200
        assert response.status_code == expected, (what, response.text)
        _assert_allowed(response)
    assert "www-authenticate" in answers["401"].headers["access-control-expose-headers"].lower()


def test_a_429_exposes_retry_after(micro_bundle: Path, served_root: tuple[Path, Path]) -> None:
    settings = _settings(
        micro_bundle, served_root[1], cors_origins=[ORIGIN], rate_limit_per_minute=2
    )
    with live_server(settings) as server, server.client(headers={"Origin": ORIGIN}) as client:
        for _ in range(2):
            assert client.post(SEARCH, json={"text": QUERY}).status_code == 200
        limited = [
            client.post(SEARCH, json={"text": QUERY}),  # the fast path's 429
            client.post("/knn-service", json={"text": QUERY, "indice_name": "images"}),
        ]
    for response in limited:
        assert response.status_code == 429, response.text
        assert int(response.headers["retry-after"]) >= 1
        _assert_allowed(response)
        exposed = [h.strip() for h in response.headers["access-control-expose-headers"].split(",")]
        assert set(CORS_EXPOSED_HEADERS) <= set(exposed)


def test_without_an_allow_list_there_is_no_cors(
    micro_bundle: Path, served_root: tuple[Path, Path]
) -> None:
    with live_server(_settings(micro_bundle, served_root[1])) as server, server.client() as client:
        preflight = _preflight(client, "/knn-service")
        search = client.post(SEARCH, json={"text": QUERY, "k": 2}, headers={"Origin": ORIGIN})
    assert preflight.status_code == 405
    assert _cors_headers(preflight) == {}
    assert search.status_code == 200
    assert _cors_headers(search) == {}


def test_the_allow_list_reads_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COTS_CORS_ORIGINS", f'["{ORIGIN}", "http://localhost:3000"]')
    assert Settings().cors_origins == [ORIGIN, "http://localhost:3000"]
