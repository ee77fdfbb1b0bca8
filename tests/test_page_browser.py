"""The search page end to end: a headless Chromium (Playwright's sync API) drives the page of a
live server holding the images, captions and videos collections.

The browser is Debian's chromium, never one Playwright downloads: ``$COTS_CHROMIUM``
(``scripts/test.sh`` sets it) or else ``scripts/chromium.sh``. The tests fail when there is
none, rather than skip: a skipped browser test reads as a passed one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote_plus

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Error,
    FilePayload,
    Locator,
    Page,
    Route,
    expect,
)

from indexer.filters import Filter, as_filter, parse_where, split_where
from service.settings import Settings
from tests.chromium import TIMEOUT_MS, launched_chromium
from tests.live_server import LiveServer, live_server
from tests.service_helpers import KEYS, SEARCH_KEY

ROOT = Path(__file__).resolve().parents[1]
PAGE_SIZE = 12  # app.js asks for this many hits a page
KINDS = {"images": "image", "captions": "caption", "videos": "video"}
QUERY = "a small red circle on a striped background"
DASH = "\u2013"  # the page joins its ranges (results, seconds) with an en dash, not a hyphen

# An <img> without a src counts as complete: with an API key the page sets it only once its
# own fetch (with the key) has the bytes, so "done" needs the src as well.
ALL_IMAGES_DONE = """() => [...document.querySelectorAll('[data-testid="hit"] img')]
    .every((img) => img.hasAttribute("src") && img.complete)"""
IMAGE_WIDTHS = """() => [...document.querySelectorAll('[data-testid="hit"] img')]
    .map((img) => img.naturalWidth)"""
VIDEO_STATES = """() => [...document.querySelectorAll('[data-testid="hit"] video')]
    .map((video) => ({src: video.getAttribute("src"), ready: video.readyState,
                      error: video.error && video.error.code, time: video.currentTime}))"""
ALL_VIDEOS_READY = f"() => ({VIDEO_STATES})().every((state) => state.ready >= 1)"


@pytest.fixture(scope="module")
def server(micro_bundle: Path, served_root: tuple[Path, Path]) -> Iterator[LiveServer]:
    with live_server(Settings(bundle=micro_bundle, index_root=served_root[1])) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # Playwright's assertions give up after 5 s; a busy two-core machine can need longer.
    expect.set_options(timeout=TIMEOUT_MS)
    with launched_chromium() as launched:
        yield launched


@dataclass
class Tab:
    """A fresh page on the search page, and every console error and uncaught exception."""

    page: Page
    errors: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)

    def on_page_error(self, error: Error) -> None:
        self.errors.append(f"uncaught: {error}")

    def testid(self, name: str) -> Locator:
        return self.page.get_by_test_id(name)

    def ids(self) -> list[int]:
        return [int(value) for value in self.hits_attribute("data-id")]

    def hits_attribute(self, name: str) -> list[str]:
        values = self.page.eval_on_selector_all(
            '[data-testid="hit"]', "(hits, name) => hits.map((hit) => hit.getAttribute(name))", name
        )
        return [str(value) for value in values]

    def search(self, collection: str, text: str) -> None:
        self.testid("collection").select_option(collection)
        self.testid("query").fill(text)
        self.testid("search").click()
        self.wait_done()

    def upload(self, collection: str, files: Path | FilePayload) -> None:
        self.testid("collection").select_option(collection)
        self.testid("upload").set_input_files(files)

    def wait_done(self) -> None:
        expect(self.testid("results")).to_have_attribute("data-state", "done")

    def assert_images_loaded(self, count: int) -> None:
        self.page.wait_for_function(ALL_IMAGES_DONE)
        widths = self.page.evaluate(IMAGE_WIDTHS)
        assert len(widths) == count, "a card lost its image (see the console errors)"
        assert all(width > 0 for width in widths), widths

    def assert_no_console_errors(self) -> None:
        assert self.errors == []


def new_tab(context: BrowserContext) -> Tab:
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    opened = Tab(page)
    page.on("console", opened.on_console)
    page.on("pageerror", opened.on_page_error)
    return opened


def expect_collections_listed(tab: Tab) -> None:
    # The selector is filled once /v1/collections has answered.
    options = tab.page.locator('[data-testid="collection"] option[data-kind]')
    expect(options).to_have_count(len(KINDS))


@pytest.fixture
def tab(browser: Browser, server: LiveServer) -> Iterator[Tab]:
    context = browser.new_context()
    try:
        opened = new_tab(context)
        opened.page.goto(server.url)
        expect_collections_listed(opened)
        yield opened
    finally:
        context.close()


def api_upload(server: LiveServer, collection: str, name: str, data: bytes) -> httpx.Response:
    with server.client() as client:
        return client.post(
            f"/v1/collections/{collection}/search/upload",
            files={"image": (name, data, "application/octet-stream")},
            data={"k": str(PAGE_SIZE), "offset": "0"},
        )


def corpus_image(served_root: tuple[Path, Path]) -> Path:
    return sorted((served_root[0] / "images" / "0000").glob("*.png"))[5]


def test_page_lists_the_collections_with_their_kinds(tab: Tab) -> None:
    options = tab.page.locator('[data-testid="collection"] option[data-kind]')
    listed = {
        str(options.nth(index).get_attribute("value")): (
            options.nth(index).get_attribute("data-kind"),
            options.nth(index).inner_text(),
        )
        for index in range(options.count())
    }
    assert set(listed) == set(KINDS)
    for name, kind in KINDS.items():
        assert listed[name][0] == kind
        assert kind in listed[name][1]
    tab.assert_no_console_errors()


def test_text_query_shows_a_page_of_images_and_pages_through(tab: Tab, server: LiveServer) -> None:
    first = server.search("images", text=QUERY, k=PAGE_SIZE, offset=0)
    second = server.search("images", text=QUERY, k=PAGE_SIZE, offset=PAGE_SIZE)

    tab.search("images", QUERY)
    expect(tab.testid("hit")).to_have_count(PAGE_SIZE)
    assert tab.ids() == [hit["id"] for hit in first["hits"]]
    assert set(tab.hits_attribute("data-kind")) == {"image"}
    captions = tab.testid("hit-caption").all_inner_texts()
    assert captions == [hit["caption"] for hit in first["hits"]]
    assert all(captions)
    scores = [float(text) for text in tab.testid("hit-score").all_inner_texts()]
    assert scores == pytest.approx([hit["score"] for hit in first["hits"]], abs=1e-3)
    tab.assert_images_loaded(PAGE_SIZE)
    expect(tab.testid("page-info")).to_have_text(f"results 1{DASH}{PAGE_SIZE}")
    expect(tab.testid("status")).to_contain_text("ms")
    expect(tab.testid("prev")).to_be_disabled()

    tab.testid("next").click()
    expect(tab.testid("page-info")).to_have_text(f"results {PAGE_SIZE + 1}{DASH}{2 * PAGE_SIZE}")
    tab.wait_done()
    assert tab.ids() == [hit["id"] for hit in second["hits"]]
    assert not set(tab.ids()) & {hit["id"] for hit in first["hits"]}
    tab.assert_images_loaded(PAGE_SIZE)

    tab.testid("prev").click()
    expect(tab.testid("page-info")).to_have_text(f"results 1{DASH}{PAGE_SIZE}")
    tab.wait_done()
    assert tab.ids() == [hit["id"] for hit in first["hits"]]
    expect(tab.testid("prev")).to_be_disabled()
    expect(tab.testid("error")).to_be_hidden()
    tab.assert_no_console_errors()


def test_uploaded_image_finds_its_captions(
    tab: Tab, server: LiveServer, served_root: tuple[Path, Path]
) -> None:
    image = corpus_image(served_root)
    wanted = api_upload(server, "captions", image.name, image.read_bytes()).json()

    tab.upload("captions", image)
    tab.wait_done()
    expect(tab.testid("hit")).to_have_count(PAGE_SIZE)
    assert set(tab.hits_attribute("data-kind")) == {"caption"}
    assert tab.ids() == [hit["id"] for hit in wanted["hits"]]
    assert all(tab.testid("hit-caption").all_inner_texts())
    tab.assert_images_loaded(PAGE_SIZE)  # each caption's thumbnail
    expect(tab.testid("query-image")).to_contain_text(image.name)
    tab.assert_no_console_errors()


def test_uploaded_image_finds_itself_first_among_images(
    tab: Tab, server: LiveServer, served_root: tuple[Path, Path]
) -> None:
    image = corpus_image(served_root)

    tab.upload("images", image)
    tab.wait_done()
    expect(tab.testid("hit")).to_have_count(PAGE_SIZE)
    assert set(tab.hits_attribute("data-kind")) == {"image"}
    top = tab.ids()[0]
    with server.client() as client:
        item = client.get(f"/v1/collections/images/items/{top}").json()
    assert Path(item["uri"]).name == image.name
    assert float(tab.testid("hit-score").first.inner_text()) == pytest.approx(1.0, abs=2e-3)
    tab.assert_images_loaded(PAGE_SIZE)

    # Paging an image query sends the same file again, for the next page.
    tab.testid("next").click()
    expect(tab.testid("page-info")).to_have_text(f"results {PAGE_SIZE + 1}{DASH}{2 * PAGE_SIZE}")
    tab.wait_done()
    assert top not in tab.ids()
    tab.assert_no_console_errors()


def test_video_collection_shows_moments_with_their_time_range(tab: Tab) -> None:
    tab.search("videos", "a white triangle grows")
    expect(tab.testid("hit")).not_to_have_count(0)
    hits = tab.testid("hit").count()
    assert set(tab.hits_attribute("data-kind")) <= {"video", "segment"}
    assert "segment" in tab.hits_attribute("data-kind")
    ranges = tab.testid("hit-range").all_inner_texts()
    assert len(ranges) == hits
    assert all(re.fullmatch(rf"\d+\.\d{DASH}\d+\.\d s", text) for text in ranges), ranges

    # Every player has loaded its file's metadata and stands at the start of its moment.
    tab.page.wait_for_function(ALL_VIDEOS_READY)
    for state, text in zip(tab.page.evaluate(VIDEO_STATES), ranges, strict=True):
        start, end = (float(value) for value in text.removesuffix(" s").split(DASH))
        assert state["error"] is None
        assert state["src"].endswith(f"#t={start:g},{end:g}")
        assert state["time"] == pytest.approx(start, abs=0.1)
    tab.assert_no_console_errors()


def test_invalid_upload_shows_the_api_error(tab: Tab, server: LiveServer) -> None:
    data = b"these are notes, not an image\n"
    answer = api_upload(server, "captions", "notes.txt", data)
    assert answer.status_code >= 400
    message = answer.json()["error"]["message"]

    tab.upload("captions", {"name": "notes.txt", "mimeType": "text/plain", "buffer": data})
    expect(tab.testid("results")).to_have_attribute("data-state", "error")
    expect(tab.testid("error")).to_be_visible()
    expect(tab.testid("error")).to_have_text(message)
    expect(tab.testid("hit")).to_have_count(0)
    expect(tab.testid("page-info")).to_have_text("")
    # The failed request itself is a console error ("Failed to load resource"); nothing else.
    assert all("Failed to load resource" in error for error in tab.errors), tab.errors


@dataclass
class OfflineTab:
    """A page whose every request off the server is refused and recorded: the test machines
    have no network anyway, and this proves the page does not even try."""

    page: Page
    server_url: str
    refused: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def route(self, route: Route) -> None:
        url = route.request.url
        if url.startswith((f"{self.server_url}/", "data:", "blob:")):
            route.continue_()
        else:
            self.refused.append(url)
            route.abort("internetdisconnected")


@pytest.fixture
def offline_tab(browser: Browser, server: LiveServer) -> Iterator[OfflineTab]:
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    opened = OfflineTab(page, server.url)
    context.route("**/*", opened.route)
    page.on("pageerror", lambda error: opened.errors.append(f"uncaught: {error}"))
    page.on(
        "console",
        lambda message: opened.errors.append(message.text) if message.type == "error" else None,
    )
    try:
        yield opened
    finally:
        context.close()


def documented_operations(server: LiveServer) -> list[tuple[str, str, str]]:
    """(METHOD, path, operationId) of every operation in /openapi.json."""
    with server.client() as client:
        spec = client.get("/openapi.json").json()
    return [
        (method.upper(), path, operation["operationId"])
        for path, item in spec["paths"].items()
        for method, operation in item.items()
    ]


def test_swagger_ui_renders_every_operation_with_no_network(
    offline_tab: OfflineTab, server: LiveServer
) -> None:
    operations = documented_operations(server)
    assert len(operations) > 10
    page = offline_tab.page
    page.goto(f"{server.url}/docs")
    blocks = page.locator(".opblock")
    expect(blocks).to_have_count(len(operations))
    rendered = set()
    for index in range(blocks.count()):
        block = blocks.nth(index)
        method = block.locator(".opblock-summary-method").inner_text().strip()
        path = block.locator(".opblock-summary-path").get_attribute("data-path")
        rendered.add((method, path))
    assert rendered == {(method, path) for method, path, _ in operations}
    expect(page.locator(".info .title")).to_contain_text("COTS Search")
    # An operation opens and shows its parameters: the page is live, not a static shell.
    search = page.locator('.opblock-summary-path[data-path="/v1/collections/{name}/search"]')
    search.first.click()
    expect(page.locator(".opblock.is-open .opblock-section-header").first).to_be_visible()
    assert offline_tab.refused == []
    assert offline_tab.errors == []


# ReDoc's side menu shows a logo whose address is fixed in its bundle; with no network the image
# fails and ReDoc drops it (its own onError). It is the one request the page makes off the server.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def test_redoc_renders_every_operation_with_no_network(
    offline_tab: OfflineTab, server: LiveServer
) -> None:
    operations = documented_operations(server)
    page = offline_tab.page
    page.goto(f"{server.url}/redoc")
    # Each operation has a menu entry and a section, both carrying its id.
    sections = page.locator('[data-section-id*="operation/"]')
    expect(sections).to_have_count(2 * len(operations))
    ids = sections.evaluate_all("(nodes) => nodes.map((node) => node.dataset.sectionId)")
    assert {str(value).rsplit("operation/", 1)[1] for value in ids} == {
        operation_id for _, _, operation_id in operations
    }
    expect(page.locator("h1").first).to_contain_text("COTS Search")
    expect(page.locator('img[alt="redocly logo"]')).to_have_count(0)
    assert set(offline_tab.refused) <= {REDOC_LOGO}
    errors = offline_tab.errors
    assert all("Failed to load resource" in error for error in errors), errors


# ---- the filter box, linked searches and the API key ---------------------------------------

WHERE_CASES = [
    "",
    "split=test",
    "split = test ,  year>=2020",
    "split!=train, year<2000",
    "year>2019.5, year<=2.5e3",
    "tag=a|b|c",
    "tag=1|2|x",
    "flag=true, other=false, third=True",
    "n=+7, m=-3, big=12345678901234567890, almost=9007199254740991",
    "x=1_000, y=.5, z=5., w=1e400, v=nan, u=inf, t=0x10",
    "caption=red, round",
    "caption=red, round, split=test",
    "kind=image, group_id=img0000001, uri=a,b",
    "kind=42",
    "year",
    "=5",
    "year>=",
    "a=b=c",
    "a==b",
    "x=1, y",
    "any_of=1",
    ",,split=test,,",
    "a=\u00e9t\u00e9",
    "folder=2024, taken>=2024-06-01, camera_model=5, path=1|2, year=2024",
]


def random_where_texts(count: int) -> list[str]:
    """Half free-form strings of the grammar's pieces (mostly not filters: the error paths),
    half comma-joined conditions built from them (mostly filters: the typed values)."""
    rng = random.Random(20)
    fields = ["split", "year", "kind", "tag", "a_1", "group_id", "uri"]
    operators = ["=", "!=", ">", ">=", "<", "<="]
    values = ["1", "2.5", "-3", "1e3", "true", "x", "test", "image", ".", "+", "e", "1.", "a|b", ""]
    pieces = [*fields, *operators, "|", ",", " ", "\t", *values]

    def condition() -> str:
        space = rng.choice(["", " "])
        value = "|".join(rng.choice(values) for _ in range(rng.choice([1, 1, 2])))
        return f"{rng.choice(fields)}{space}{rng.choice(operators)}{space}{value}"

    texts = []
    for _ in range(count // 2):
        texts.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 9))))
        texts.append(", ".join(condition() for _ in range(rng.randint(1, 4))))
    return texts


def python_where(text: str) -> Filter | str | None:
    try:
        return parse_where(split_where(text))
    except ValueError:
        return "error"


def test_the_filter_box_reads_text_as_the_command_line_does(tab: Tab) -> None:
    texts = WHERE_CASES + random_where_texts(400)
    answers = tab.page.evaluate(
        """(texts) => texts.map((text) => {
            try { return {filters: parseWhere(text)}; }
            catch (error) { return {error: `${error.name}: ${error.message}`}; }
        })""",
        texts,
    )
    checked = 0
    for text, answer in zip(texts, answers, strict=True):
        wanted = python_where(text)
        if "error" in answer:
            assert answer["error"].startswith("WhereError"), (text, answer)
            assert wanted == "error", (text, wanted)
            continue
        try:
            # What the server makes of the page's JSON, as the service would read it.
            got: Filter | str | None = as_filter(answer["filters"])
        except ValueError:
            got = "error"
        assert got == wanted, (text, answer["filters"], wanted)
        checked += got != "error"
    assert checked > 50  # most inputs read, so the comparison covers values, not just errors
    tab.assert_no_console_errors()


def test_a_filter_narrows_the_hits_and_a_bad_one_says_why(tab: Tab, server: LiveServer) -> None:
    wanted = server.search(
        "images", text=QUERY, k=PAGE_SIZE, filters={"split": {"ne": "train"}, "kind": "image"}
    )
    assert 0 < len(wanted["hits"]) < PAGE_SIZE or wanted["next_offset"] is not None
    tab.testid("filters").fill("split!=train, kind=image")
    tab.search("images", QUERY)
    assert tab.ids() == [hit["id"] for hit in wanted["hits"]]
    assert "f=split%21%3Dtrain%2C+kind%3Dimage" in tab.page.url

    requests: list[str] = []
    tab.page.on("request", lambda request: requests.append(request.url))
    tab.testid("filters").fill("year")
    tab.testid("search").click()
    expect(tab.testid("error")).to_contain_text("'year' is not FIELD=VALUE")
    assert not [url for url in requests if "/search" in url], requests

    # A filter the server refuses (kind is one of a closed set) shows the server's message.
    tab.testid("filters").fill("kind=picture")
    tab.testid("search").click()
    expect(tab.testid("results")).to_have_attribute("data-state", "error")
    expect(tab.testid("error")).to_contain_text("kind")


def test_a_linked_search_opens_on_its_page_and_back_returns(
    browser: Browser, server: LiveServer
) -> None:
    second = server.search("captions", text=QUERY, k=PAGE_SIZE, offset=PAGE_SIZE)
    first_other = server.search("captions", text="a big green star", k=PAGE_SIZE)
    context = browser.new_context()
    try:
        tab = new_tab(context)
        link = f"{server.url}/?c=captions&q={quote_plus(QUERY)}&p=2"
        tab.page.goto(link)
        tab.wait_done()
        assert tab.ids() == [hit["id"] for hit in second["hits"]]
        expect(tab.testid("query")).to_have_value(QUERY)
        expect(tab.testid("collection")).to_have_value("captions")
        expect(tab.testid("page-info")).to_have_text(
            f"results {PAGE_SIZE + 1}{DASH}{2 * PAGE_SIZE}"
        )

        # A new query in the same collection is one new history entry, on its first page.
        tab.testid("query").fill("a big green star")
        tab.testid("search").click()
        tab.wait_done()
        assert tab.ids() == [hit["id"] for hit in first_other["hits"]]
        assert tab.page.url == f"{server.url}/?c=captions&q=a+big+green+star"
        tab.page.go_back()
        expect(tab.testid("query")).to_have_value(QUERY)
        expect(tab.testid("page-info")).to_have_text(
            f"results {PAGE_SIZE + 1}{DASH}{2 * PAGE_SIZE}"
        )
        tab.wait_done()
        assert tab.ids() == [hit["id"] for hit in second["hits"]]
        assert tab.page.url == link

        tab.page.goto(f"{server.url}/?c=nosuch&q=x")
        expect(tab.testid("error")).to_contain_text("No collection 'nosuch'")
        tab.assert_no_console_errors()
    finally:
        context.close()


@pytest.fixture(scope="module")
def keyed_server(micro_bundle: Path, served_root: tuple[Path, Path]) -> Iterator[LiveServer]:
    settings = Settings(
        bundle=micro_bundle,
        index_root=served_root[1],
        api_keys=KEYS,
        search_requires_key=True,
        rate_limit_per_minute=0,
    )
    with live_server(settings) as running:
        yield running


def test_the_key_field_opens_a_server_that_needs_a_key(
    browser: Browser, keyed_server: LiveServer
) -> None:
    headers = {"X-API-Key": SEARCH_KEY}
    with keyed_server.client(headers=headers) as client:
        response = client.post(
            "/v1/collections/images/search", json={"text": QUERY, "k": PAGE_SIZE}
        )
        wanted = response.json()
    context = browser.new_context()
    try:
        tab = new_tab(context)
        sent_keys: list[str | None] = []
        tab.page.on("request", lambda request: sent_keys.append(request.headers.get("x-api-key")))
        tab.page.goto(keyed_server.url)
        expect(tab.testid("error")).to_contain_text("Could not list the collections")
        expect(tab.testid("error")).to_contain_text("API key")

        tab.testid("api-key").fill("not-the-key")
        tab.testid("api-key").press("Enter")
        expect(tab.testid("error")).to_contain_text("invalid API key")

        tab.testid("api-key").fill(SEARCH_KEY)
        tab.testid("api-key").press("Enter")
        expect_collections_listed(tab)
        expect(tab.testid("error")).to_be_hidden()
        tab.search("images", QUERY)
        assert tab.ids() == [hit["id"] for hit in wanted["hits"]]
        # Images came through the key too (an <img> cannot send it: the page fetches them).
        tab.assert_images_loaded(PAGE_SIZE)
        assert SEARCH_KEY in sent_keys
        assert tab.page.evaluate("() => sessionStorage.getItem('cots.apiKey')") == SEARCH_KEY
        assert SEARCH_KEY not in tab.page.url

        # A reload of the tab keeps the key; a new tab (another session) does not have it.
        tab.page.reload()
        expect(tab.testid("api-key")).to_have_value(SEARCH_KEY)
        tab.wait_done()  # the URL's search ran again, with the key
        assert tab.ids() == [hit["id"] for hit in wanted["hits"]]
        fresh = new_tab(browser.new_context())
        fresh.page.goto(keyed_server.url)
        expect(fresh.testid("api-key")).to_have_value("")
        expect(fresh.testid("error")).to_contain_text("API key")
        fresh.page.context.close()

        # Video moments play through the key as well, with their time range kept.
        tab.search("videos", "a ball")
        tab.page.wait_for_function(ALL_VIDEOS_READY)
        states = tab.page.evaluate(VIDEO_STATES)
        assert states
        assert all(state["src"].startswith("blob:") for state in states), states
        assert all("#t=" in state["src"] for state in states), states
    finally:
        context.close()
