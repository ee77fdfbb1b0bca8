"""Relevance cut-off, ordering and similar-to-item over real HTTP (uvicorn, FAISS, the micro
bundle's encoder): ``min_score`` against the unfiltered answer, ``sort`` against an ordering
computed here, ``similar_to`` against the planted near-duplicates (``tests/planted.py``), the
fast path against the routed one, and the client and ``cots search`` passing the fields.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cots.cli import cli
from cots.client import AsyncClient, Client, InvalidRequestError, NotFoundError
from indexer.update import remove_from_collection
from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.planted import (
    COUNT,
    IDENTICAL,
    NEAR,
    NO_DATE,
    TRIPLE,
    build_planted,
    planted_vectors,
    taken,
)
from tests.service_helpers import assert_error, wait_for_version

NAME = "photos"
QUERY = "a small red circle on a striped background"


@pytest.fixture(scope="module")
def planted_root(micro_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("relevance") / "indices"
    build_planted(root, NAME, micro_bundle)
    return root


def _settings(bundle: Path, root: Path, *, fast: bool) -> Settings:
    return Settings(
        bundle=bundle,
        index_root=root,
        rate_limit_per_minute=0,
        reload_poll_s=0.2,
        fast_search=fast,
        limits={"max_k": 100, "max_offset": 200},
    )


@pytest.fixture(scope="module")
def servers(micro_bundle: Path, planted_root: Path) -> Iterator[dict[bool, LiveServer]]:
    """The same read-only collection behind the fast path (True) and the routed path (False)."""
    with (
        live_server(_settings(micro_bundle, planted_root, fast=True)) as fast,
        live_server(_settings(micro_bundle, planted_root, fast=False)) as routed,
    ):
        yield {True: fast, False: routed}


@pytest.fixture(scope="module")
def server(servers: dict[bool, LiveServer]) -> LiveServer:
    return servers[True]


def post(server: LiveServer, **body: Any) -> httpx.Response:
    with server.client() as client:
        return client.post(f"/v1/collections/{NAME}/search", json=body)


def ids(page: dict[str, Any]) -> list[int]:
    return [hit["id"] for hit in page["hits"]]


def query_vector(seed: int, dim: int) -> list[float]:
    x = np.random.default_rng(seed).standard_normal(dim)
    return (x / np.linalg.norm(x)).tolist()


def dim_of(server: LiveServer) -> int:
    with server.client() as client:
        return int(client.get(f"/v1/collections/{NAME}").json()["dim"])


def everything(server: LiveServer, **query: Any) -> list[dict[str, Any]]:
    """Every hit of ``query``, unfiltered and unsorted: the oracle."""
    page = server.search(NAME, k=100, **query)
    assert len(page["hits"]) >= COUNT - 1
    hits: list[dict[str, Any]] = page["hits"]
    return hits


def follow(server: LiveServer, k: int, **query: Any) -> tuple[list[int], list[int | None]]:
    """(every id, every next_offset) paging through ``query`` k at a time."""
    found: list[int] = []
    offsets: list[int | None] = []
    offset: int | None = 0
    while offset is not None:
        page = server.search(NAME, k=k, offset=offset, **query)
        found += ids(page)
        offset = page["next_offset"]
        offsets.append(offset)
        assert len(offsets) < 50
    return found, offsets


@pytest.mark.parametrize("query", ["embedding", "text"])
def test_min_score_cuts_exactly_at_the_threshold(server: LiveServer, query: str) -> None:
    given: dict[str, Any] = (
        {"embedding": query_vector(1, dim_of(server))} if query == "embedding" else {"text": QUERY}
    )
    full = everything(server, **given)
    scores = [hit["score"] for hit in full]
    assert scores[9] > scores[10]  # a cut-off between the 10th and 11th hits
    threshold = scores[9]  # a hit scoring exactly the threshold is kept

    page = server.search(NAME, k=50, min_score=threshold, **given)
    assert ids(page) == ids({"hits": full[:10]})
    assert all(hit["score"] >= threshold for hit in page["hits"])
    assert page["next_offset"] is None

    # A page that ends exactly at the cut is the last: next_offset null, not a page of nothing.
    assert server.search(NAME, k=10, min_score=threshold, **given)["next_offset"] is None
    first = server.search(NAME, k=5, min_score=threshold, **given)
    assert first["next_offset"] == 5
    assert server.search(NAME, k=5, offset=5, min_score=threshold, **given)["next_offset"] is None

    found, offsets = follow(server, 4, min_score=threshold, **given)
    assert found == ids({"hits": full[:10]})
    assert offsets == [4, 8, None]

    # Just above a hit's score leaves that hit out.
    above = float(np.nextafter(threshold, 2.0))
    assert ids(server.search(NAME, k=50, min_score=above, **given)) == ids({"hits": full[:9]})
    # Without min_score nothing changes: the same hits as before.
    assert ids(server.search(NAME, k=10, **given)) == ids({"hits": full[:10]})


def expected_order(hits: list[dict[str, Any]], descending: bool) -> list[int]:
    """The documented order, computed independently: by date (ordinals), then score best
    first, then id; items without a date after all the others, by score then id."""

    def key(hit: dict[str, Any]) -> tuple[int, int, float, int]:
        when = taken(hit["id"])
        if when is None:
            return (1, 0, -hit["score"], hit["id"])
        day = date.fromisoformat(when).toordinal()
        return (0, -day if descending else day, -hit["score"], hit["id"])

    return [hit["id"] for hit in sorted(hits, key=key)]


@pytest.mark.parametrize("sort", ["-taken", "taken"])
def test_sort_orders_exactly_the_hits_above_min_score(server: LiveServer, sort: str) -> None:
    given = {"embedding": query_vector(2, dim_of(server))}
    full = everything(server, **given)
    threshold = full[29]["score"]
    above = [hit for hit in full if hit["score"] >= threshold]
    assert len(above) == 30
    assert any(hit["id"] in NO_DATE for hit in above)  # some without the field
    wanted = expected_order(above, descending=sort.startswith("-"))
    assert wanted != [hit["id"] for hit in above]  # the order is not the score order

    page = server.search(NAME, k=100, min_score=threshold, sort=sort, **given)
    assert ids(page) == wanted
    assert page["next_offset"] is None
    # The hits without a date come last.
    assert set(ids(page)[-len(NO_DATE & set(wanted)) :]) <= NO_DATE

    found, offsets = follow(server, 7, min_score=threshold, sort=sort, **given)
    assert found == wanted  # pages are consecutive slices of one order
    assert offsets == [7, 14, 21, 28, None]


def test_similar_to_finds_the_planted_neighbours_never_the_item(server: LiveServer) -> None:
    page = server.search(NAME, similar_to=NEAR[0], k=100)
    assert page["query"] == "similar_to"
    assert ids(page)[0] == NEAR[1]
    assert NEAR[0] not in ids(page)
    assert len(page["hits"]) == COUNT - 1  # everything else
    assert page["next_offset"] is None

    assert set(ids(server.search(NAME, similar_to=TRIPLE[0], k=2))) == set(TRIPLE[1:])
    identical = server.search(NAME, similar_to=IDENTICAL[0], k=3)
    assert identical["hits"][0]["id"] == IDENTICAL[1]
    assert identical["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)

    # The same as searching with the item's own vector, minus the item.
    own = planted_vectors(dim_of(server))[NEAR[0]].tolist()
    by_vector = server.search(NAME, embedding=own, k=100)
    assert ids(by_vector)[0] == NEAR[0]
    assert ids(by_vector)[1:] == ids(page)
    paged, offsets = follow(server, 9, similar_to=NEAR[0])
    assert paged == ids(page)
    assert offsets[-1] is None
    assert len(offsets) == 7  # 59 hits: 6 full pages and 5 more

    # With a cut-off, only the planted ones; with sort, the same ones by date.
    close = server.search(NAME, similar_to=TRIPLE[0], min_score=0.9, k=10)
    assert sorted(ids(close)) == sorted(TRIPLE[1:])
    assert close["next_offset"] is None
    dated = server.search(NAME, similar_to=TRIPLE[0], min_score=0.9, sort="-taken", k=10)
    assert ids(dated) == expected_order(close["hits"], descending=True)


def test_similar_to_an_unknown_item_is_404_naming_it(server: LiveServer) -> None:
    assert_error(post(server, similar_to=987654), 404, "987654", NAME)


def test_invalid_values_are_422_naming_the_field(server: LiveServer) -> None:
    assert_error(post(server, text=QUERY, sort="-taken"), 422, "sort needs min_score")
    assert_error(post(server, text=QUERY, sort="-ta ken", min_score=0.1), 422, "sort")
    assert_error(post(server, text=QUERY, sort="x" * 65, min_score=0.1), 422, "sort")
    assert_error(post(server, text=QUERY, min_score=1.5), 422, "min_score")
    assert_error(post(server, text=QUERY, min_score="high"), 422, "min_score")
    assert_error(post(server, similar_to=-1), 422, "similar_to")
    assert_error(post(server, similar_to=3, text=QUERY), 422, "got text, similar_to")
    assert_error(post(server), 422, "similar_to")

    upload = f"/v1/collections/{NAME}/search/upload"
    files = {"image": ("q.png", png_bytes(), "image/png")}
    with server.client() as client:
        response = client.post(upload, files=files, data={"sort": "-taken"})
        assert_error(response, 422, "sort needs min_score")
        assert_error(client.post(upload, files=files, data={"min_score": "2"}), 422, "min_score")
        response = client.post(upload, files=files, data={"min_score": "0", "sort": "a b"})
        assert_error(response, 422, "sort")


def png_bytes() -> bytes:
    pixels = np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_upload_takes_min_score_and_sort_as_form_fields(server: LiveServer) -> None:
    data = png_bytes()
    full = everything(server, image=base64.b64encode(data).decode())
    threshold = full[14]["score"]
    wanted = expected_order(full[:15], descending=True)
    with server.client() as client:
        response = client.post(
            f"/v1/collections/{NAME}/search/upload",
            files={"image": ("q.png", data, "image/png")},
            data={"k": "50", "min_score": str(threshold), "sort": "-taken"},
        )
    assert response.status_code == 200, response.text
    assert ids(response.json()) == wanted


def _comparable(response: httpx.Response) -> tuple[int, Any]:
    body = response.json()
    body.pop("took_ms", None)
    body.pop("cached", None)
    return response.status_code, body


def test_fast_and_routed_paths_answer_alike(servers: dict[bool, LiveServer]) -> None:
    vector = query_vector(4, dim_of(servers[True]))
    bodies: list[dict[str, Any]] = [
        {"embedding": vector, "k": 7, "min_score": 0.05},
        {"embedding": vector, "k": 7, "offset": 7, "min_score": 0.0, "sort": "-taken"},
        {"text": QUERY, "k": 5, "min_score": -0.2, "sort": "taken"},
        {"similar_to": NEAR[0], "k": 4},
        {"similar_to": TRIPLE[0], "k": 4, "min_score": 0.5, "sort": "folder"},
        {"similar_to": 10_000},
        {"text": QUERY, "sort": "-taken"},
        {"similar_to": 1, "min_score": 3},
    ]
    for body in bodies:
        fast, routed = (_comparable(post(servers[flag], **body)) for flag in (True, False))
        assert fast == routed, body
    # The answers above are the features' own, not errors.
    assert [_comparable(post(servers[True], **body))[0] for body in bodies] == [
        200, 200, 200, 200, 200, 404, 422, 422,
    ]  # fmt: skip


def test_batched_queries_of_every_kind_answer_as_alone(server: LiveServer) -> None:
    """Searches batched together (the engine groups sorted ones apart, with their depth)
    answer as each does alone."""
    vector = query_vector(5, dim_of(server))
    bodies: list[dict[str, Any]] = [
        {"embedding": vector, "k": 5},
        {"embedding": vector, "k": 5, "min_score": 0.1},
        {"embedding": vector, "k": 5, "min_score": 0.0, "sort": "-taken"},
        {"similar_to": NEAR[0], "k": 3},
        {"similar_to": TRIPLE[0], "k": 3, "min_score": 0.9},
        {"text": QUERY, "k": 5, "offset": 5},
    ] * 3
    alone = [ids(server.search(NAME, **body)) for body in bodies]

    async def together() -> list[list[int]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            responses = await asyncio.gather(
                *(client.post(f"/v1/collections/{NAME}/search", json=body) for body in bodies)
            )
        return [ids(response.json()) for response in responses]

    assert asyncio.run(together()) == alone


def test_a_removed_item_is_404_and_no_longer_anyones_neighbour(
    micro_bundle: Path, tmp_path: Path
) -> None:
    root = tmp_path / "indices"
    build_planted(root, NAME, micro_bundle)
    with live_server(_settings(micro_bundle, root, fast=True)) as server:
        assert ids(server.search(NAME, similar_to=NEAR[0], k=1)) == [NEAR[1]]
        version, removed = remove_from_collection(root, NAME, ids=[NEAR[1]])
        assert removed == 1
        with server.client() as client:
            wait_for_version(client, NAME, version)
        assert_error(post(server, similar_to=NEAR[1]), 404, str(NEAR[1]), "removed")
        assert NEAR[1] not in ids(server.search(NAME, similar_to=NEAR[0], k=100))


def test_the_clients_and_cots_search_pass_the_fields(server: LiveServer) -> None:
    vector = query_vector(6, dim_of(server))
    threshold = everything(server, embedding=vector)[19]["score"]
    fields = {"min_score": threshold, "sort": "-taken"}
    wanted = server.search(NAME, embedding=vector, k=50, **fields)
    similar = server.search(NAME, similar_to=TRIPLE[0], k=5, min_score=0.9)
    assert len(wanted["hits"]) == 20
    assert len(similar["hits"]) == 2
    with Client(server.url) as client:
        page = client.search(NAME, embedding=vector, k=50, **fields)
        assert [hit.id for hit in page.hits] == ids(wanted)
        page = client.search(NAME, similar_to=TRIPLE[0], k=5, min_score=0.9)
        assert page.query == "similar_to"
        assert [hit.id for hit in page.hits] == ids(similar)
        paged = [
            hit.id for p in client.pages(NAME, embedding=vector, k=6, **fields) for hit in p.hits
        ]
        assert paged == ids(wanted)
        with pytest.raises(InvalidRequestError, match="sort needs min_score"):
            client.search(NAME, embedding=vector, sort="-taken")
        with pytest.raises(NotFoundError, match="987654"):
            client.search(NAME, similar_to=987654)

    async def via_async() -> tuple[list[int], list[int]]:
        async with AsyncClient(server.url) as client:
            sorted_page = await client.search(NAME, embedding=vector, k=50, **fields)
            like = await client.search(NAME, similar_to=TRIPLE[0], k=5, min_score=0.9)
        return [hit.id for hit in sorted_page.hits], [hit.id for hit in like.hits]

    assert asyncio.run(via_async()) == (ids(wanted), ids(similar))

    runner = CliRunner()
    base = ["search", "--url", server.url, "-c", NAME, "--json"]
    result = runner.invoke(cli, [*base, "--similar-to", str(TRIPLE[0]), "--min-score", "0.9"])
    assert result.exit_code == 0, result.output
    assert ids(json.loads(result.output)) == ids(similar)
    text = server.search(NAME, text=QUERY, k=50, min_score=threshold, sort="taken")
    result = runner.invoke(
        cli, [*base, QUERY, "-k", "50", "--min-score", str(threshold), "--sort", "taken"]
    )
    assert result.exit_code == 0, result.output
    assert ids(json.loads(result.output)) == ids(text)
    table = runner.invoke(cli, [*base[:-1], "--similar-to", str(NEAR[0]), "-k", "1"])
    assert table.exit_code == 0, table.output
    assert f"photos/{NEAR[1]:03d}.jpg" in table.output
    assert "similar_to query" in table.output
    refused = runner.invoke(cli, [*base, QUERY, "--sort", "-taken"])
    assert refused.exit_code == 2
    assert "--sort needs --min-score" in refused.output
    both = runner.invoke(cli, [*base, QUERY, "--similar-to", "3"])
    assert both.exit_code == 2
    assert "exactly one" in both.output
