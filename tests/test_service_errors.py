"""Every error the API gives: right status, JSON body, a message that says why, no trace."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st
from PIL import Image

from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.service_helpers import (
    ADMIN_KEY,
    KEYS,
    SEARCH_KEY,
    WRITE_KEY,
    assert_error,
    b64,
    copy_root,
    corpus_images,
    wait_for_job,
    wait_for_version,
)

SEARCH = "/v1/collections/images/search"


@pytest.fixture(scope="module")
def server(micro_bundle: Path, served_root: tuple[Path, Path]) -> Iterator[LiveServer]:
    settings = Settings(
        bundle=micro_bundle,
        index_root=served_root[1],
        api_keys=KEYS,
        rate_limit_per_minute=0,
        limits={
            "max_body_bytes": 200_000,
            "max_image_pixels": 64 * 64,
            "max_text_chars": 200,
            "max_k": 50,
        },
    )
    with live_server(settings) as running:
        yield running


def _png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), "red").save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_requests_are_400(server: LiveServer) -> None:
    with server.client() as client:
        assert_error(client.post(SEARCH, json={"image": "not base64 !!"}), 400, "base64")
        corrupt = "iVBORw0KGgoAAAANSUhEUgAAAA=="  # a PNG signature cut short
        assert_error(client.post(SEARCH, json={"image": corrupt}), 400, "image")
        assert_error(
            client.post(
                "/knn-service", content=b"{not json", headers={"content-type": "text/plain"}
            ),
            400,
            "json",
        )


def test_missing_and_wrong_keys_are_401_and_missing_scopes_403(server: LiveServer) -> None:
    remove = "/v1/collections/images/items/remove"
    with server.client() as client:
        assert_error(client.post(remove, json={"ids": [1]}), 401, "api key", "write")
        assert_error(
            client.post(remove, json={"ids": [1]}, headers={"X-API-Key": "wrong"}), 401, "invalid"
        )
        assert_error(client.post(SEARCH, json={"text": "x"}, headers={"X-API-Key": "wrong"}), 401)
        assert_error(
            client.post(remove, json={"ids": [1]}, headers={"X-API-Key": SEARCH_KEY}),
            403,
            "scope 'write'",
        )
        assert_error(
            client.post(
                "/v1/collections/images/reindex", json={}, headers={"X-API-Key": WRITE_KEY}
            ),
            403,
            "admin",
        )
        bearer = {"Authorization": f"Bearer {SEARCH_KEY}"}
        assert client.post(SEARCH, json={"text": "x"}, headers=bearer).status_code == 200
        assert_error(
            client.post(SEARCH, json={"image_url": "http://example.com/a.png"}), 403, "fetch"
        )
        # No data root here: every path is refused for that (test_paths_that_leave_the_data_root
        # checks the refusals of a server that has one).
        assert_error(
            client.post(
                "/v1/collections/images/reindex",
                json={"corpus": "../etc"},
                headers={"X-API-Key": ADMIN_KEY},
            ),
            403,
            "COTS_DATA_ROOT",
        )


def test_paths_that_leave_the_data_root_are_403(
    micro_bundle: Path, served_root: tuple[Path, Path], tmp_path: Path
) -> None:
    """With a data root set, a re-index corpus or an item path that leaves it (by ``..``, as an
    absolute path, or through a symlink inside the root) is refused with 403 naming the reason,
    whether the file exists or not; paths inside the root, symlinks among them, still work."""
    corpus, root = served_root
    data = tmp_path / "data"
    shutil.copytree(corpus, data / "corpus")
    outside = tmp_path / "outside"  # a whole readable corpus the server must not read
    shutil.copytree(corpus, outside)
    outside_image = corpus_images(outside)[0]
    image = corpus_images(data / "corpus")[0].relative_to(data)
    (data / "out").symlink_to(outside, target_is_directory=True)
    (data / "escape.png").symlink_to(outside_image)
    (data / "inside").symlink_to(data / "corpus", target_is_directory=True)
    escaping_corpora = [
        "../outside/images.csv",
        "corpus/../../outside/images.csv",
        "../nothing-here.csv",  # refused as outside, not as missing: existence is not told
        str(outside / "images.csv"),
        "out/images.csv",
    ]
    escaping_items = [
        "../outside/" + outside_image.relative_to(outside).as_posix(),
        "corpus/../../outside/" + outside_image.relative_to(outside).as_posix(),
        str(outside_image),
        "out/" + outside_image.relative_to(outside).as_posix(),
        "escape.png",
    ]
    settings = Settings(
        bundle=micro_bundle,
        index_root=copy_root(root, tmp_path),
        data_root=data,
        api_keys=KEYS,
        rate_limit_per_minute=0,
    )
    admin = {"X-API-Key": ADMIN_KEY}
    reindex, add = "/v1/collections/images/reindex", "/v1/collections/images/items"
    with live_server(settings) as running, running.client(headers=admin) as client:
        for path in escaping_corpora:
            refused = client.post(reindex, json={"corpus": path})
            assert_error(refused, 403, "outside the data root", path[:40])
        for path in escaping_items:
            refused = client.post(add, json={"items": [{"path": path, "caption": "x"}]})
            assert_error(refused, 403, "outside the data root", path[:40])
        # One escaping item refuses the whole request, the good items before it included.
        mixed = [{"path": image.as_posix()}, {"path": "escape.png"}]
        assert_error(client.post(add, json={"items": mixed}), 403, "outside the data root")
        assert client.get("/readyz").json()["collections"]["images"] == 1  # nothing ran
        assert_error(
            client.post(reindex, json={"corpus": "corpus/nothing-here.csv"}), 400, "not exist"
        )
        for body, url in (
            ({"corpus": "corpus/images.csv"}, reindex),
            ({"corpus": "inside/images.csv"}, reindex),
            ({"items": [{"path": image.as_posix(), "caption": "a shape"}]}, add),
            ({"items": [{"path": "inside/" + image.relative_to("corpus").as_posix()}]}, add),
        ):
            started = client.post(url, json=body)
            assert started.status_code == 202, (body, started.text)
            job = wait_for_job(client, started.json()["id"], ADMIN_KEY)
            assert job["status"] == "finished", (body, job)
        wait_for_version(client, "images", 5)  # each of the four made a version


def test_unknown_things_are_404(server: LiveServer) -> None:
    with server.client() as client:
        assert_error(client.post("/v1/collections/nope/search", json={"text": "x"}), 404, "nope")
        assert_error(client.get("/v1/collections/images/items/999999"), 404, "999999")
        assert_error(client.get("/v1/nothing-here"), 404, "no route")
        remove = client.get("/v1/collections/images/items/remove")
        assert_error(remove, 405, "allowed: POST")
        assert_error(
            client.get("/v1/jobs/local-abc", headers={"X-API-Key": WRITE_KEY}), 404, "local-abc"
        )


def test_too_large_is_413(server: LiveServer) -> None:
    with server.client() as client:
        assert_error(client.post(SEARCH, content=b"x" * 300_000), 413, "200,000 bytes")
        big = _png(100)  # 10,000 pixels > 64 * 64
        assert_error(client.post(SEARCH, json={"image": b64(big)}), 413, "pixels")
        upload = client.post(
            "/v1/collections/images/search/upload", files={"image": ("a.png", big, "image/png")}
        )
        assert_error(upload, 413, "too large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(30):
                yield b"y" * 10_000

        assert_error(client.post(SEARCH, content=chunks()), 413)


def test_unsupported_media_is_415(server: LiveServer) -> None:
    with server.client() as client:
        text_file = b"this is not an image at all"
        assert_error(client.post(SEARCH, json={"image": b64(text_file)}), 415, "accepted format")
        assert_error(
            client.post(
                "/v1/collections/captions/search/upload",
                files={"image": ("a.txt", text_file, "text/plain")},
            ),
            415,
        )


def test_invalid_requests_are_422(server: LiveServer, served_root: tuple[Path, Path]) -> None:
    with server.client() as client:
        assert_error(client.post(SEARCH, json={"text": "x", "k": 51}), 422, "limit is 50")
        # One cap, the server's: past any fixed schema bound the message still names it.
        for k in (20_000, 2**40):
            assert_error(client.post(SEARCH, json={"text": "x", "k": k}), 422, "limit is 50")
            form = {"k": str(k)}
            png = {"image": ("a.png", _png(8), "image/png")}
            upload = client.post(f"{SEARCH}/upload", data=form, files=png)
            assert_error(upload, 422, "limit is 50")
        assert_error(client.post(SEARCH, json={"text": "x", "offset": 10**7}), 422, "offset")
        assert_error(client.post(SEARCH, json={"text": "x", "k": 0}), 422, "k")
        assert_error(client.post(SEARCH, json={"text": "x" * 201}), 422, "limit is 200")
        assert_error(client.post(SEARCH, json={"text": "   "}), 422, "empty")
        image = corpus_images(served_root[0])[0]
        assert_error(
            client.post(SEARCH, json={"text": "x", "image": b64(image)}), 422, "exactly one"
        )
        assert_error(client.post(SEARCH, json={}), 422, "exactly one")
        assert_error(client.post(SEARCH, json={"embedding": [0.1, 0.2]}), 422, "values")
        assert_error(client.post(SEARCH, json={"text": "x", "unknown": 1}), 422, "unknown")
        assert_error(
            client.post(SEARCH, json={"text": "x", "filters": {"bad key!": 1}}), 422, "letters"
        )
        assert_error(
            client.post(SEARCH, content=b"{]", headers={"content-type": "application/json"}),
            422,
        )
        assert_error(client.post("/v1/embed/texts", json={"texts": ["a"] * 65}), 422, "limit is 64")
        admin = {"X-API-Key": ADMIN_KEY}
        reindex = "/v1/collections/images/reindex"
        assert_error(client.post(reindex, json={"factory": "bogus"}, headers=admin), 422, "bogus")
        assert_error(client.post(reindex, json={"split": ""}, headers=admin), 422, "split")
        too_big = {"ids": [2**70]}
        assert_error(
            client.post("/v1/collections/images/items/remove", json=too_big, headers=admin), 422
        )


def test_rate_limit_is_429_with_retry_after(micro_bundle: Path, served_root: tuple[Path, Path]):
    settings = Settings(
        bundle=micro_bundle, index_root=served_root[1], api_keys=KEYS, rate_limit_per_minute=3
    )
    with live_server(settings) as running, running.client() as client:
        key = {"X-API-Key": SEARCH_KEY}
        for _ in range(3):
            assert client.post(SEARCH, json={"text": "x"}, headers=key).status_code == 200
        limited = client.post(SEARCH, json={"text": "x"}, headers=key)
        assert_error(limited, 429, "3 requests per minute", "reader")
        assert 1 <= int(limited.headers["retry-after"]) <= 61
        # The limit is per key: an anonymous caller still has its own allowance.
        assert client.post(SEARCH, json={"text": "x"}).status_code == 200


def test_full_queue_is_503_with_retry_after(micro_bundle: Path, served_root: tuple[Path, Path]):
    settings = Settings(
        bundle=micro_bundle,
        index_root=served_root[1],
        rate_limit_per_minute=0,
        batch={"max_queue": 2, "max_batch": 64, "max_wait_ms": 400},
    )
    with live_server(settings) as running, running.client() as client:

        def ask(i: int) -> tuple[int, dict[str, str], str]:
            response = client.post(SEARCH, json={"text": f"query {i}"})
            return response.status_code, dict(response.headers), response.text

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(ask, range(6)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses.count(200) >= 2, statuses
    assert 503 in statuses, statuses
    for status, headers, text in results:
        if status == 503:
            assert headers["retry-after"] == "1"
            assert "busy" in json.loads(text)["error"]["message"]


def test_oversized_and_odd_filters_are_422_naming_the_limit(server: LiveServer) -> None:
    wide = {f"k{i}": 1 for i in range(1000)}
    with server.client() as client:
        for path, body in (
            (SEARCH, {"text": "x", "filters": wide}),
            ("/v1/collections/images/items/remove", {"filters": wide}),
        ):
            headers = {"X-API-Key": ADMIN_KEY}
            error = assert_error(client.post(path, json=body, headers=headers), 422, "filters")
            assert "at most 64 conditions; this one has 1000" in error["message"]
        long_list = {"split": {"in": list(range(1001))}}
        assert_error(
            client.post(SEARCH, json={"text": "x", "filters": long_list}), 422, "at most 1000"
        )
        assert_error(
            client.post(SEARCH, json={"text": "x", "filters": {"year": {"gte": "soon"}}}),
            422,
            "ISO 8601",
        )
        upload = client.post(
            SEARCH + "/upload",
            data={"filters": json.dumps(wide)},
            files={"image": ("q.png", _png(16), "image/png")},
        )
        assert_error(upload, 422, "at most 64 conditions")


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
    | st.sampled_from(["2020-01-01", "any_of", "in", "gte", "exists", "kind", "image"]),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(
            st.sampled_from(
                ["split", "kind", "uri", "any_of", "in", "ne", "gte", "lt", "exists", "é"]
            )
            | st.text(max_size=6),
            inner,
            max_size=6,
        )
    ),
    max_leaves=40,
)


@fuzz_settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(filters=JSON_VALUES)
def test_no_filter_a_client_can_send_gets_a_5xx(server: LiveServer, filters: Any) -> None:
    with server.client() as client:
        response = client.post(SEARCH, json={"text": "a red circle", "k": 5, "filters": filters})
    assert response.status_code in (200, 422), (filters, response.text)
    if response.status_code == 422:
        assert response.json()["error"]["message"].startswith("filters"), response.text
