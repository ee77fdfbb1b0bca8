"""The search page's relevance controls in a headless Chromium (as ``tests/test_page_browser.py``
drives it): a min score and an order that page as the API does, a "similar" link on each hit,
and both kept in the page's URL. Every answer is compared with the API's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, expect

from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.planted import NEAR, build_planted
from tests.test_page_browser import PAGE_SIZE, QUERY, Tab, browser, new_tab

__all__ = ["browser"]  # the module's browser fixture, used here

NAME = "photos"


@pytest.fixture(scope="module")
def server(micro_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("relevance-page") / "indices"
    build_planted(root, NAME, micro_bundle)
    with live_server(Settings(bundle=micro_bundle, index_root=root)) as running:
        yield running


@pytest.fixture
def tab(browser: Browser, server: LiveServer) -> Iterator[Tab]:
    context = browser.new_context()
    try:
        opened = new_tab(context)
        yield opened
    finally:
        context.close()


def ids(page: dict[str, Any]) -> list[int]:
    return [hit["id"] for hit in page["hits"]]


def query_of(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def uncaught(tab: Tab) -> list[str]:
    # The planted items have no files here: their thumbnails' 404s are expected console lines.
    return [error for error in tab.errors if error.startswith("uncaught")]


def test_min_score_and_order_page_as_the_api_does(tab: Tab, server: LiveServer) -> None:
    full = server.search(NAME, text=QUERY, k=100)["hits"]
    threshold = full[19]["score"]
    wanted = server.search(NAME, text=QUERY, k=100, min_score=threshold, sort="-taken")
    assert len(wanted["hits"]) == 20

    tab.page.goto(server.url)
    expect(tab.testid("collection")).to_have_value(NAME)
    tab.testid("sort").select_option("-taken")
    tab.testid("query").fill(QUERY)
    tab.testid("search").click()
    expect(tab.testid("error")).to_contain_text("Sorting needs a min score")

    tab.testid("min-score").fill(repr(threshold))
    tab.testid("search").click()
    tab.wait_done()
    assert tab.ids() == ids(wanted)[:PAGE_SIZE]
    state = query_of(tab.page.url)
    assert state["m"] == [repr(threshold)]
    assert state["s"] == ["-taken"]
    tab.testid("next").click()
    tab.wait_done()
    assert tab.ids() == ids(wanted)[PAGE_SIZE:]
    expect(tab.testid("next")).to_be_disabled()  # the cut-off ends the results

    # The order back to relevance: the same hits above the cut-off, by score.
    tab.testid("sort").select_option("")
    tab.wait_done()
    assert tab.ids() == [hit["id"] for hit in full[:PAGE_SIZE]]
    assert "s" not in query_of(tab.page.url)
    assert uncaught(tab) == []


def test_similar_links_search_by_item_and_live_in_the_url(tab: Tab, server: LiveServer) -> None:
    tab.page.goto(f"{server.url}/?c={NAME}&q={QUERY.replace(' ', '+')}")
    tab.wait_done()
    first = tab.ids()[0]
    tab.page.locator(f'[data-testid="hit"][data-id="{first}"] [data-testid="hit-similar"]').click()
    tab.wait_done()
    assert tab.ids() == ids(server.search(NAME, similar_to=first, k=PAGE_SIZE))
    assert first not in tab.ids()
    assert query_of(tab.page.url) == {"c": [NAME], "like": [str(first)]}
    expect(tab.testid("query-similar")).to_have_text(f"items like item {first}")
    expect(tab.testid("query")).to_have_value("")

    tab.page.go_back()
    tab.wait_done()
    expect(tab.testid("query")).to_have_value(QUERY)
    expect(tab.testid("query-similar")).to_be_hidden()

    # A linked similar search with a min score: only the planted near-duplicate.
    tab.page.goto(f"{server.url}/?c={NAME}&like={NEAR[0]}&m=0.9")
    tab.wait_done()
    assert tab.ids() == [NEAR[1]]
    expect(tab.testid("min-score")).to_have_value("0.9")
    assert uncaught(tab) == []
