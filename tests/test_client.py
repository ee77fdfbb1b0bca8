"""``cots.client`` and ``cots search`` against a live server (uvicorn on a port): every answer
compared with the same request sent by hand, errors carrying the server's own status and
message, a 429 waited out after the server's ``Retry-After``, and writes with and without a key.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cots.cli import cli
from cots.client import (
    NO_RETRY,
    AsyncClient,
    Client,
    ConnectionFailedError,
    ForbiddenError,
    InvalidRequestError,
    NotFoundError,
    RateLimitedError,
    RetryPolicy,
    UnauthorizedError,
)
from cots.client.cli import hits_table
from indexer.filters import Filter
from service.schemas import SearchResponse
from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.service_helpers import ADMIN_KEY, KEYS, WRITE_KEY, copy_root, corpus_images
from tests.tools import free_port

QUERY = "a small red circle on a striped background"
MAX_K = 50


@pytest.fixture(scope="module")
def server(
    micro_bundle: Path, served_root: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    root = copy_root(served_root[1], tmp_path_factory.mktemp("client"))
    settings = Settings(
        bundle=micro_bundle,
        index_root=root,
        api_keys=KEYS,
        rate_limit_per_minute=0,
        reload_poll_s=0.2,
        limits={"max_k": MAX_K},
    )
    with live_server(settings) as running:
        yield running


def ids(page: SearchResponse | dict[str, Any]) -> list[int]:
    if isinstance(page, SearchResponse):
        return [hit.id for hit in page.hits]
    return [hit["id"] for hit in page["hits"]]


def test_search_by_text_image_and_embedding_matches_the_api(
    server: LiveServer, served_root: tuple[Path, Path]
) -> None:
    wanted = server.search("images", text=QUERY, k=8)
    image = corpus_images(served_root[0])[5]
    with Client(server.url) as client:
        page = client.search("images", QUERY, k=8)
        assert isinstance(page, SearchResponse)
        assert ids(page) == ids(wanted)
        assert [hit.score for hit in page.hits] == pytest.approx(
            [hit["score"] for hit in wanted["hits"]], abs=1e-6
        )
        assert page.query == "text"

        # The text's own embedding finds the same items, as an embedding query.
        embedding = client.embed_texts([QUERY]).embeddings[0]
        assert ids(client.search("images", embedding=embedding, k=8)) == ids(wanted)

        # An image by path and by bytes: the same upload, itself first.
        by_path = client.search("images", image=image, k=5)
        by_bytes = client.search("images", image=image.read_bytes(), k=5)
        assert by_path.query == "image"
        assert ids(by_path) == ids(by_bytes)
        assert Path(client.item("images", by_path.hits[0].id).uri).name == image.name
        assert by_path.hits[0].score == pytest.approx(1.0, abs=2e-3)
        assert len(client.embed_images([image, image.read_bytes()]).embeddings) == 2


def test_filters_and_paging(server: LiveServer) -> None:
    with Client(server.url) as client:
        everything = client.search("images", QUERY, k=MAX_K)
        split = everything.hits[0].metadata.get("split")
        assert split is not None, "the synthetic corpus records a split"
        wanted = server.search("images", text=QUERY, k=10, filters={"split": split})
        as_mapping = client.search("images", QUERY, k=10, filters={"split": split})
        as_model = client.search(
            "images", QUERY, k=10, filters=Filter.model_validate({"split": {"in": [split]}})
        )
        assert ids(as_mapping) == ids(as_model) == ids(wanted)
        assert {hit.metadata["split"] for hit in as_mapping.hits} == {split}

        pages = list(client.pages("images", QUERY, k=7))
        assert pages[-1].next_offset is None
        assert all(page.next_offset is not None for page in pages[:-1])
        paged = [item for page in pages for item in ids(page)]
        collection = client.collection("images")
        assert len(paged) == collection.live
        assert paged[:MAX_K] == ids(everything)
        assert len(list(client.pages("images", QUERY, k=7, max_pages=2))) == 2


def test_collections_are_listed_as_the_service_models(server: LiveServer) -> None:
    with Client(server.url) as client:
        listed = client.collections()
        assert {info.name for info in listed.collections} == {"images", "captions", "videos"}
        assert client.collection("videos").kind == "video"
        ready = client.ready()
        assert ready.status == "ready"
        assert set(ready.collections) == {"images", "captions", "videos"}


def test_errors_carry_the_server_status_and_message(server: LiveServer) -> None:
    with Client(server.url) as client:
        with pytest.raises(InvalidRequestError) as too_many:
            client.search("images", QUERY, k=MAX_K + 1)
        assert too_many.value.status == 422
        assert too_many.value.code == "invalid_request"
        assert f"{MAX_K}" in too_many.value.message

        wide = {f"key{number}": number for number in range(1000)}
        with pytest.raises(InvalidRequestError, match="at most 64 conditions"):
            client.search("images", QUERY, filters=wide)

        with pytest.raises(NotFoundError) as missing:
            client.search("no-such-collection", QUERY)
        assert "no-such-collection" in missing.value.message
        with pytest.raises(ValueError, match="exactly one"):
            client.search("images", QUERY, embedding=[0.0])


def test_a_write_needs_a_key_and_then_lands(
    server: LiveServer, served_root: tuple[Path, Path]
) -> None:
    image = corpus_images(served_root[0])[0]
    with Client(server.url) as anonymous:
        before = anonymous.collection("captions")
        with pytest.raises(UnauthorizedError) as refused:
            anonymous.add_images("captions", [image], ["a brand new caption"])
        assert "X-API-Key" in refused.value.message
    with Client(server.url, api_key=WRITE_KEY) as writer:
        with pytest.raises(ForbiddenError, match="admin"):
            writer.reindex("captions")
        job = writer.add_images("captions", [image], ["a brand new caption about zebras"])
        assert job.kind == "add"
        done = writer.wait(job, timeout_s=120, poll_s=0.1)
        assert done.status == "finished"
        # The replica that ran the job serves its version once the job has finished.
        assert writer.ready().collections["captions"] == done.result["version"]
        after = writer.collection("captions")
        assert after.live == before.live + 1
        hits = writer.search("captions", "a brand new caption about zebras", k=3).hits
        new_id = next(hit.id for hit in hits if hit.caption == "a brand new caption about zebras")

        removed = writer.wait(writer.remove_items("captions", ids=[new_id]), poll_s=0.1)
        assert removed.status == "finished"
    with Client(server.url, api_key=ADMIN_KEY) as admin:
        assert admin.compact("captions").kind == "compact"


def test_a_429_is_retried_after_retry_after(
    micro_bundle: Path, served_root: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        bundle=micro_bundle,
        index_root=served_root[1],
        collections=["images"],
        rate_limit_per_minute=2,
        rate_limit_window_s=1,
    )
    with live_server(settings) as limited:
        with (
            Client(limited.url, retry=NO_RETRY) as impatient,
            pytest.raises(RateLimitedError) as refused,
        ):
            burst(impatient, 8)
        assert refused.value.status == 429
        assert refused.value.retry_after is not None
        assert refused.value.retry_after >= 1
        assert "2 requests per 1 s" in refused.value.message

        caplog.set_level(logging.INFO, logger="cots.client")
        with Client(limited.url, retry=RetryPolicy(attempts=4, max_wait_s=5)) as patient:
            started = time.monotonic()
            pages = [patient.search("images", QUERY, k=3) for _ in range(5)]
            took = time.monotonic() - started
        assert all(len(page.hits) == 3 for page in pages)
        retried = [record for record in caplog.records if "429" in record.getMessage()]
        assert retried, "no 429 was met, so nothing was retried"
        # Each retry waited the server's Retry-After (whole seconds, at least 1).
        assert took >= len(retried) * 1.0

        # A wait longer than the policy allows is not waited: the 429 comes back at once.
        with (
            Client(limited.url, retry=RetryPolicy(max_wait_s=0.5)) as hasty,
            pytest.raises(RateLimitedError),
        ):
            burst(hasty, 8)


def burst(client: Client, count: int) -> None:
    for _ in range(count):
        client.search("images", QUERY, k=3)


def test_an_unreachable_server_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with (
        Client(url, retry=RetryPolicy(attempts=2, backoff_s=0.01)) as client,
        pytest.raises(ConnectionFailedError, match=r"127\.0\.0\.1"),
    ):
        client.collections()
    with pytest.raises(ValueError, match="http"):
        Client("localhost:8000")


def test_the_async_client_gives_the_same_answers(server: LiveServer) -> None:
    wanted = server.search("images", text=QUERY, k=6)

    async def run() -> tuple[list[int], list[list[int]], str]:
        async with AsyncClient(server.url) as client:
            concurrent = await asyncio.gather(
                *(client.search("images", QUERY, k=6) for _ in range(4))
            )
            paged = [page async for page in client.pages("images", QUERY, k=4, max_pages=3)]
            try:
                await client.add_images("images", [b"not read"], ["x"])
            except UnauthorizedError as error:
                refused = error.message
            return ids(concurrent[0]), [ids(page) for page in paged], refused

    first, paged, refused = asyncio.run(run())
    assert first == ids(wanted)
    assert [item for page in paged for item in page][:6] == ids(wanted)
    assert "API key" in refused


def test_cots_search_prints_a_table_and_json(
    server: LiveServer, served_root: tuple[Path, Path]
) -> None:
    wanted = server.search("images", text=QUERY, k=4)
    runner = CliRunner()
    table = runner.invoke(cli, ["search", "--url", server.url, "-c", "images", QUERY, "-k", "4"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["#", "score", "id", "kind", "item"]
    shown = [int(line.split()[2]) for line in lines[1:5]]
    assert shown == ids(wanted)
    assert "text query on images" in lines[-1]

    as_json = runner.invoke(
        cli, ["search", "--url", server.url, "-c", "images", QUERY, "-k", "4", "--json"]
    )
    assert as_json.exit_code == 0, as_json.output
    assert ids(json.loads(as_json.output)) == ids(wanted)

    image = corpus_images(served_root[0])[5]
    by_image = runner.invoke(
        cli, ["search", "--url", server.url, "-c", "captions", "--image", str(image), "--json"]
    )
    assert by_image.exit_code == 0, by_image.output
    assert json.loads(by_image.output)["query"] == "image"

    split = wanted["hits"][0]["metadata"]["split"]
    filtered = runner.invoke(
        cli,
        [
            "search",
            "--url",
            server.url,
            "-c",
            "images",
            QUERY,
            "--where",
            f"split={split}",
            "--json",
        ],
    )
    assert filtered.exit_code == 0, filtered.output
    assert {hit["metadata"]["split"] for hit in json.loads(filtered.output)["hits"]} == {split}


def test_cots_search_shows_the_server_error(server: LiveServer) -> None:
    runner = CliRunner()
    missing = runner.invoke(cli, ["search", "--url", server.url, "-c", "nope", QUERY])
    assert missing.exit_code == 1
    assert "404 not_found" in missing.output
    assert "nope" in missing.output
    assert "Traceback" not in missing.output
    too_many = runner.invoke(
        cli, ["search", "--url", server.url, "-c", "images", QUERY, "-k", "99"]
    )
    assert too_many.exit_code == 1
    assert "422 invalid_request" in too_many.output
    both = runner.invoke(cli, ["search", "--url", server.url, "-c", "images"])
    assert both.exit_code == 2
    assert "exactly one" in both.output
    bad_where = runner.invoke(
        cli, ["search", "--url", server.url, "-c", "images", QUERY, "--where", "year"]
    )
    assert bad_where.exit_code == 2
    assert "FIELD=VALUE" in bad_where.output


def test_the_table_fits_the_terminal() -> None:
    hit = {
        "id": 7,
        "score": 0.5,
        "kind": "segment",
        "uri": "/data/videos/v.mp4",
        "caption": None,
        "group_id": "v0001",
        "metadata": {},
        "start_s": 1.0,
        "end_s": 3.0,
        "media_url": "/v1/collections/videos/items/7/media",
    }
    page = SearchResponse.model_validate(
        {
            "collection": "videos",
            "version": 1,
            "query": "text",
            "k": 1,
            "offset": 0,
            "cached": False,
            "took_ms": 1.0,
            "next_offset": 1,
            "hits": [hit, {**hit, "id": 8, "group_id": "v" * 300}],
        }
    )
    text = hits_table(page, width=80)
    assert "1.0\u20133.0 s of v0001 (/data/videos/v.mp4)" in text
    assert all(len(line) <= 80 for line in text.splitlines()[:3])
    assert text.splitlines()[-1].endswith("next page: --offset 1")
