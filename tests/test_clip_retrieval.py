"""clip-retrieval compatibility: its real ``ClipClient`` and clip-front's exact requests against
a live server (``/knn-service``, ``/metadata``, ``/indices-list``).

``scripts/test.sh`` installs ``clip-retrieval`` without its dependencies (they pin numpy<2 and
torch, against ours), and ``import clip_retrieval`` would import torch-heavy modules, so the
client's own file is loaded by location: it needs only ``requests``. Without the package these
tests fail, saying how to install it.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import requests

from service.settings import ApiKey, Settings
from tests.live_server import LiveServer, live_server

CLIP_RETRIEVAL = "clip-retrieval==2.45.0"
TEXT = "a red circle above a small blue square"

# What clip-front's ClipService.callClipService sends: fetch() with a string body, so the
# Content-Type is text/plain, and every key present (null when unused, aesthetics as strings).
CLIP_FRONT_HEADERS = {"Content-Type": "text/plain;charset=UTF-8"}
CLIP_FRONT_BODY: dict[str, Any] = {
    "text": None,
    "image": None,
    "image_url": None,
    "embedding_input": None,
    "modality": "image",
    "num_images": 40,
    "indice_name": "images",
    "num_result_ids": 3000,
    "use_mclip": False,
    "deduplicate": True,
    "use_safety_model": True,
    "use_violence_detector": True,
    "aesthetic_score": "",
    "aesthetic_weight": "0.5",
}


@functools.cache
def load_clip_client() -> ModuleType:
    """``clip_retrieval/clip_client.py`` of the installed package, without its ``__init__``.
    Called in the tests rather than a fixture, so a missing package fails them (not errors)."""
    found = importlib.util.find_spec("clip_retrieval")
    if found is None or not found.submodule_search_locations:
        pytest.fail(
            f"{CLIP_RETRIEVAL} is not installed, and these tests run its real ClipClient. "
            "Install it without its dependencies (scripts/test.sh does): "
            f'python -m pip install --no-deps "{CLIP_RETRIEVAL}"',
            pytrace=False,
        )
    path = Path(next(iter(found.submodule_search_locations))) / "clip_client.py"
    spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    if spec is None or spec.loader is None:
        pytest.fail(f"cannot load {path} of {CLIP_RETRIEVAL}", pytrace=False)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(micro_bundle: Path, served_root: tuple[Path, Path]) -> Iterator[LiveServer]:
    _, root = served_root
    settings = Settings(
        bundle=micro_bundle,
        index_root=root,
        rate_limit_per_minute=0,
        api_keys=[ApiKey(name="t", sha256=ApiKey.hash("secret"), scopes=["write", "admin"])],
    )
    with live_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def pngs(served_root: tuple[Path, Path]) -> list[Path]:
    corpus, _ = served_root
    found = sorted((corpus / "images" / "0000").glob("*.png"))
    assert len(found) == 48
    return found


def client_for(server: LiveServer, indice: str, modality: str) -> Any:
    """The real ClipClient, as its README shows it, for 5 results."""
    module = load_clip_client()
    return module.ClipClient(
        url=server.url + "/knn-service",
        indice_name=indice,
        modality=module.Modality(modality),
        num_images=5,
    )


def search(http: httpx.Client, collection: str, k: int, **query: Any) -> list[dict[str, Any]]:
    response = http.post(f"/v1/collections/{collection}/search", json={**query, "k": k})
    assert response.status_code == 200, response.text
    hits: list[dict[str, Any]] = response.json()["hits"]
    return hits


def clip_front(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    return http.post(path, content=json.dumps(body), headers=CLIP_FRONT_HEADERS)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def assert_same(results: list[dict[str, Any]], hits: list[dict[str, Any]]) -> None:
    assert [r["id"] for r in results] == [h["id"] for h in hits]
    assert [r["similarity"] for r in results] == pytest.approx([h["score"] for h in hits], abs=1e-5)


def assert_error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["status"] == status
    message: str = error["message"]
    return message


# ClipClient -------------------------------------------------------------------------------------


def test_text_query_is_the_search_api(server: LiveServer, http: httpx.Client) -> None:
    results = client_for(server, "images", "image").query(text=TEXT)
    assert isinstance(results, list)
    assert len(results) == 5
    for row in results:
        assert {"id", "similarity", "url", "caption"} <= row.keys()
        assert isinstance(row["id"], int)
        assert isinstance(row["caption"], str)
        assert row["caption"]
    hits = search(http, "images", 5, text=TEXT)
    assert_same(results, hits)
    # The metadata is the item's: its caption and metadata fields, and its file on this server.
    for row, hit in zip(results, hits, strict=True):
        assert row["caption"] == hit["caption"]
        assert row["url"] == server.url + hit["media_url"]
        for key, value in hit["metadata"].items():
            assert row[key] == value


def test_image_query_finds_the_image(
    server: LiveServer, http: httpx.Client, pngs: list[Path]
) -> None:
    client = client_for(server, "images", "image")
    for png in (pngs[0], pngs[17], pngs[-1]):
        results = client.query(image=str(png))
        assert len(results) == 5
        top = results[0]
        assert top["similarity"] == pytest.approx(1.0, abs=1e-3)
        item = http.get(f"/v1/collections/images/items/{top['id']}").json()
        assert Path(item["uri"]).resolve() == png.resolve()
        assert_same(results, search(http, "images", 5, image=b64(png)))


def test_embedding_query_is_the_text_query(server: LiveServer, http: httpx.Client) -> None:
    response = http.post("/v1/embed/texts", json={"texts": [TEXT]})
    assert response.status_code == 200, response.text
    vector = response.json()["embeddings"][0]
    client = client_for(server, "images", "image")
    by_vector = client.query(embedding_input=vector)
    by_text = client.query(text=TEXT)
    assert [r["id"] for r in by_vector] == [r["id"] for r in by_text]
    assert [r["similarity"] for r in by_vector] == pytest.approx(
        [r["similarity"] for r in by_text], abs=1e-5
    )


def test_text_modality_returns_captions(
    server: LiveServer, http: httpx.Client, pngs: list[Path]
) -> None:
    client = client_for(server, "captions", "text")
    results = client.query(image=str(pngs[3]))
    assert len(results) == 5
    hits = search(http, "captions", 5, image=b64(pngs[3]))
    assert_same(results, hits)
    for row, hit in zip(results, hits, strict=True):
        assert hit["kind"] == "caption"
        assert isinstance(row["caption"], str)
        assert row["caption"]
        assert row["caption"] == hit["caption"]


def test_video_results_carry_their_moment(server: LiveServer) -> None:
    results = client_for(server, "videos", "image").query(text="a triangle grows")
    assert results
    for row in results:
        assert {"id", "similarity", "url", "start_s", "end_s"} <= row.keys()
        assert row["start_s"] < row["end_s"]


def test_result_urls_fetch_the_images(server: LiveServer) -> None:
    results = client_for(server, "images", "image").query(text=TEXT)
    for row in results:
        response = requests.get(row["url"], timeout=30)
        assert response.status_code == 200, row["url"]
        assert response.headers["content-type"].startswith("image/")
        assert response.content[:8] == b"\x89PNG\r\n\x1a\n"


# clip-front's requests, byte for byte ------------------------------------------------------------


def test_clip_front_lists_indices(http: httpx.Client) -> None:
    response = http.get("/indices-list")
    assert response.status_code == 200, response.text
    assert response.json() == ["captions", "images", "videos"]


def test_clip_front_text_search_then_metadata(http: httpx.Client) -> None:
    body = {**CLIP_FRONT_BODY, "text": TEXT, "num_images": 3, "num_result_ids": 10}
    response = clip_front(http, "/knn-service", body)
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 10
    assert_same(results, search(http, "images", 10, text=TEXT))
    for row in results[:3]:
        assert {"id", "similarity", "url", "caption"} <= row.keys()
    for row in results[3:]:
        assert row.keys() == {"id", "similarity"}  # metadata comes later, from /metadata

    # The same query with metadata for every result: what /metadata must answer.
    full = clip_front(http, "/knn-service", {**body, "num_images": 10}).json()
    expected = {row["id"]: {k: v for k, v in row.items() if k not in ("id", "similarity")}
                for row in full}  # fmt: skip
    ids = [row["id"] for row in results[3:]]
    response = clip_front(http, "/metadata", {"ids": ids, "indice_name": "images"})
    assert response.status_code == 200, response.text
    metas = response.json()
    assert [m["id"] for m in metas] == ids
    for meta in metas:
        assert meta.keys() == {"id", "metadata"}
        assert {"url", "caption"} <= meta["metadata"].keys()
        assert meta["metadata"] == expected[meta["id"]]


def test_clip_front_default_counts_are_capped(http: httpx.Client, server: LiveServer) -> None:
    # clip-front asks for 40 images of 3000 result ids, over the server's max_k (1000):
    # the server answers what it has (the collection holds 48 images) rather than refusing.
    assert server.settings.limits.max_k < CLIP_FRONT_BODY["num_result_ids"]
    response = clip_front(http, "/knn-service", {**CLIP_FRONT_BODY, "text": TEXT})
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 48
    assert all({"url", "caption"} <= row.keys() for row in results[:40])
    assert all(row.keys() == {"id", "similarity"} for row in results[40:])
    # Its "download" button asks for 10,000 of each.
    download = {**CLIP_FRONT_BODY, "text": TEXT, "num_images": 10_000, "num_result_ids": 10_000}
    response = clip_front(http, "/knn-service", download)
    assert response.status_code == 200, response.text
    assert len(response.json()) == 48
    assert all("url" in row for row in response.json())


def test_clip_front_image_search(http: httpx.Client, pngs: list[Path]) -> None:
    # An uploaded file: the text box is "", the image base64 without its data: URL prefix.
    body = {**CLIP_FRONT_BODY, "text": "", "image": b64(pngs[5]), "num_result_ids": 20}
    response = clip_front(http, "/knn-service", body)
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 20  # num_result_ids, even under num_images (as clip-back answers)
    assert all("url" in row for row in results)
    assert results[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    item = http.get(f"/v1/collections/images/items/{results[0]['id']}").json()
    assert Path(item["uri"]).resolve() == pngs[5].resolve()


def test_clip_front_caption_search(http: httpx.Client, pngs: list[Path]) -> None:
    body = {**CLIP_FRONT_BODY, "image": b64(pngs[9]), "indice_name": "captions"}
    body.update(modality="text", num_images=4, num_result_ids=8)
    response = clip_front(http, "/knn-service", body)
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 8
    assert all(isinstance(row["caption"], str) for row in results[:4])


def test_metadata_of_unknown_and_no_ids(http: httpx.Client) -> None:
    response = clip_front(http, "/metadata", {"ids": [0, 10**12], "indice_name": "images"})
    assert response.status_code == 200, response.text
    known, unknown = response.json()
    assert known["id"] == 0
    assert "url" in known["metadata"]
    assert unknown == {"id": 10**12, "metadata": {}}
    response = clip_front(http, "/metadata", {"ids": [], "indice_name": "images"})
    assert response.status_code == 200, response.text
    assert response.json() == []


# Errors: JSON {"error": {...}} with a status clip-front and ClipClient callers can act on -------


def test_modality_mismatch_names_the_fitting_indices(
    http: httpx.Client, server: LiveServer
) -> None:
    body = {**CLIP_FRONT_BODY, "text": TEXT, "modality": "text"}  # text results from images
    message = assert_error(clip_front(http, "/knn-service", body), 400)
    assert "captions" in message
    # ClipClient hands back the JSON it gets: the error object, where results would be.
    answer = client_for(server, "images", "text").query(text=TEXT)
    assert answer["error"]["status"] == 400
    assert "captions" in answer["error"]["message"]
    body = {**CLIP_FRONT_BODY, "text": TEXT, "indice_name": "captions"}  # images from captions
    message = assert_error(clip_front(http, "/knn-service", body), 400)
    assert "images" in message
    assert "videos" in message


def test_unknown_indice_is_404(http: httpx.Client) -> None:
    body = {**CLIP_FRONT_BODY, "text": TEXT, "indice_name": "laion5B"}
    assert "laion5B" in assert_error(clip_front(http, "/knn-service", body), 404)
    body = {"ids": [1, 2], "indice_name": "laion5B"}
    assert_error(clip_front(http, "/metadata", body), 404)


@pytest.mark.parametrize(
    "raw",
    [b"text=a+red+circle", b"{", b"\xff\xfe", b"[" * 100_000],
    ids=["form", "truncated", "not-utf8", "deeply-nested"],
)
def test_a_body_that_is_not_json_is_400(http: httpx.Client, raw: bytes) -> None:
    for path in ("/knn-service", "/metadata"):
        response = http.post(path, content=raw, headers=CLIP_FRONT_HEADERS)
        assert "JSON" in assert_error(response, 400)


def test_invalid_fields_are_422(http: httpx.Client) -> None:
    body = {**CLIP_FRONT_BODY, "text": TEXT, "num_images": 0}
    assert "num_images" in assert_error(clip_front(http, "/knn-service", body), 422)
    body = {**CLIP_FRONT_BODY, "text": TEXT, "modality": "audio"}
    assert "modality" in assert_error(clip_front(http, "/knn-service", body), 422)
    assert_error(clip_front(http, "/knn-service", [TEXT]), 422)
    assert_error(clip_front(http, "/metadata", {"ids": [-1], "indice_name": "images"}), 422)


def test_no_query_is_400(http: httpx.Client) -> None:
    message = assert_error(clip_front(http, "/knn-service", {**CLIP_FRONT_BODY, "text": ""}), 400)
    assert "text" in message


def test_image_url_without_allow_list_is_403(http: httpx.Client, server: LiveServer) -> None:
    assert server.settings.url_fetch_allowlist == []
    body = {**CLIP_FRONT_BODY, "image_url": "http://example.com/cat.jpg"}
    assert "URL" in assert_error(clip_front(http, "/knn-service", body), 403)
    # ClipClient sends an image that starts with "http" as image_url.
    answer = client_for(server, "images", "image").query(image="http://example.com/cat.jpg")
    assert answer["error"]["status"] == 403
