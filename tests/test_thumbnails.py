"""Thumbnails over HTTP (issue 37, item 6): ``GET .../items/{id}/media?w=N`` of a live server.

A collection of the test's own photos (one stored sideways with EXIF orientation 6, large
enough for the reduced-scale JPEG decode to matter, a PNG, and one file broken after the
build), plus the served videos collection: upright, at most ``w`` wide and never upscaled,
cached on disk and served again without decoding, refused with a 4xx naming the problem.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps
from playwright.sync_api import Browser, Page

from indexer.build import build_collection
from runtime.video_decode import read_video
from service import thumbnails
from service.settings import Settings
from tests.chromium import TIMEOUT_MS, launched_chromium
from tests.live_server import LiveServer, live_server
from tests.micro import build_spec
from tests.service_helpers import KEYS, SEARCH_KEY, assert_error

ORIENTATION = 0x0112
# Stored 1600x800, shown 800x1600: red on top and blue below once upright.
SIDEWAYS_SIZE = (1600, 800)


def _sideways_jpeg(path: Path) -> None:
    """Stored pixels red left, blue right; orientation 6 (rotate 90 degrees clockwise to show)
    puts red on top."""
    image = Image.new("RGB", SIDEWAYS_SIZE, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, SIDEWAYS_SIZE[0] // 2, SIDEWAYS_SIZE[1]))
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    image.save(path, format="JPEG", quality=92, exif=exif)


def _photo_corpus(folder: Path) -> Path:
    folder.mkdir()
    _sideways_jpeg(folder / "sideways.jpg")
    Image.new("RGB", (40, 30), (0, 160, 0)).save(folder / "small.png")
    Image.new("RGB", (300, 200), (200, 200, 0)).save(folder / "doomed.jpg")
    Image.new("RGB", (300, 200), (0, 200, 200)).save(folder / "broken.jpg")
    rows = ["filepath,caption"] + [
        f"{name},{caption}"
        for name, caption in [
            ("sideways.jpg", "a sideways photo"),
            ("small.png", "a small green picture"),
            ("doomed.jpg", "a photo deleted after the build"),
            ("broken.jpg", "a photo broken after the build"),
        ]
    ]
    (folder / "photos.csv").write_text("\n".join(rows) + "\n")
    return folder / "photos.csv"


@pytest.fixture(scope="module")
def photos(micro_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(photo folder, index root) of collection "photos", with doomed.jpg deleted and
    broken.jpg overwritten by bytes that are no image, after the build."""
    base = tmp_path_factory.mktemp("thumbs")
    csv = _photo_corpus(base / "photos")
    root = base / "indices"
    build_collection(build_spec(root, micro_bundle, csv, kind="image"), progress=None)
    (base / "photos" / "doomed.jpg").unlink()
    (base / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg after all")
    return base / "photos", root


@pytest.fixture(scope="module")
def server(
    micro_bundle: Path, photos: tuple[Path, Path], served_root: tuple[Path, Path]
) -> Iterator[LiveServer]:
    # The videos collection of the shared root, served beside the photos: its root is another
    # folder, so the photos' root gets the video collection by a link.
    (photos[1] / "videos").symlink_to(served_root[1] / "videos", target_is_directory=True)
    settings = Settings(bundle=micro_bundle, index_root=photos[1], rate_limit_per_minute=0)
    with live_server(settings) as running:
        yield running


@pytest.fixture
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as opened:
        yield opened


@pytest.fixture
def renders(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every thumbnail the (in-process) server decodes: (file name, w)."""
    seen: list[tuple[str, int]] = []
    render = thumbnails.render

    def counting(source: Path, width: int, **options: Any) -> bytes:
        seen.append((source.name, width))
        return render(source, width, **options)

    monkeypatch.setattr(thumbnails, "render", counting)
    return seen


def _item_ids(client: httpx.Client, collection: str = "photos") -> dict[str, dict[str, Any]]:
    """Every item of ``collection`` by file name (a text search for all of them)."""
    answer = client.post(
        f"/v1/collections/{collection}/search", json={"text": "a photo", "k": 100}
    ).json()
    return {Path(hit["uri"]).name: hit for hit in answer["hits"]}


def _thumb(
    client: httpx.Client, hit: dict[str, Any], w: int | str, **options: Any
) -> httpx.Response:
    return client.get(hit["media_url"], params={"w": w}, **options)


def _image(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "JPEG"
    return image.convert("RGB")


def _rgb(image: Image.Image, xy: tuple[int, int]) -> tuple[int, int, int]:
    red, green, blue = np.asarray(image)[xy[1], xy[0]].tolist()
    return red, green, blue


def test_a_sideways_photo_comes_back_upright_and_w_wide(
    client: httpx.Client, photos: tuple[Path, Path], renders: list[tuple[str, int]]
) -> None:
    hit = _item_ids(client)["sideways.jpg"]
    thumb = _image(_thumb(client, hit, 100))
    assert thumb.size == (100, 200)  # upright: taller than wide, aspect kept
    # The oracle: Pillow's own transpose of the full-size file, shrunk the same way.
    upright = ImageOps.exif_transpose(Image.open(photos[0] / "sideways.jpg")).convert("RGB")
    expected = np.asarray(upright.resize((100, 200)), dtype=np.float64)
    assert np.abs(np.asarray(thumb, dtype=np.float64) - expected).mean() < 6
    top, bottom = _rgb(thumb, (50, 20)), _rgb(thumb, (50, 180))
    assert top[0] > 200 > top[2], top  # red on top
    assert bottom[2] > 200 > bottom[0], bottom
    assert renders == [("sideways.jpg", 100)]

    # At most w wide at every width; never upscaled past the file's own (upright) width.
    for w in (32, 257, 1024):
        assert _image(_thumb(client, hit, w)).size[0] == min(w, 800)
    small = _image(_thumb(client, _item_ids(client)["small.png"], 256))
    assert small.size == (40, 30)
    assert _rgb(small, (20, 15))[1] > 140


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(photos: tuple[Path, Path]) -> None:
    # 1600 px wide for a 100 px thumbnail: the 1/8 DCT scale suffices (200 px), so at most
    # 200x100 pixels are decoded, not 1600x800; a cap below the full size proves it.
    data = (photos[0] / "sideways.jpg").read_bytes()
    decoded = thumbnails._decode(data, 100, max_pixels=200 * 100)
    assert decoded.size == (200, 100)


def test_a_thumbnail_is_cached_on_disk_and_served_again_without_decoding(
    client: httpx.Client, photos: tuple[Path, Path], renders: list[tuple[str, int]]
) -> None:
    hit = _item_ids(client)["small.png"]
    first = _thumb(client, hit, 64)
    assert first.status_code == 200
    etag = first.headers["etag"]
    assert "max-age" in first.headers["cache-control"]
    # The default cache folder is .thumbnails inside the index root, named by the ETag's key.
    cached = thumbnails.cached_path(photos[1] / ".thumbnails", etag.strip('"'))
    assert cached.is_file()
    assert cached.read_bytes() == first.content
    written = cached.stat().st_mtime_ns

    again = _thumb(client, hit, 64)
    assert again.content == first.content
    assert again.headers["etag"] == etag
    assert cached.stat().st_mtime_ns == written  # read, not written again
    revalidated = _thumb(client, hit, 64, headers={"If-None-Match": etag})
    assert revalidated.status_code == 304
    assert revalidated.content == b""
    assert renders == [("small.png", 64)]  # one decode for three answers

    # Another width is another thumbnail; a changed file is another key, never a stale one.
    assert _thumb(client, hit, 32).headers["etag"] != etag
    source = photos[0] / "small.png"
    Image.new("RGB", (40, 30), (250, 0, 250)).save(source)
    os.utime(source, ns=(written + 10**9, written + 10**9))
    changed = _thumb(client, hit, 64, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert _rgb(_image(changed), (20, 15))[1] < 60  # magenta now, not green
    assert renders == [("small.png", 64), ("small.png", 32), ("small.png", 64)]


def test_an_unwritable_cache_folder_serves_the_thumbnail_from_memory(
    micro_bundle: Path, photos: tuple[Path, Path], tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    settings = Settings(
        bundle=micro_bundle, index_root=photos[1], thumbnail_dir=blocker, collections=["photos"]
    )
    with live_server(settings) as server, server.client() as client:
        hit = _item_ids(client)["sideways.jpg"]
        assert _image(_thumb(client, hit, 50)).size == (50, 100)


@pytest.mark.parametrize("w", ["31", "1025", "0", "-5"])
def test_a_width_outside_the_range_is_a_422_naming_it(client: httpx.Client, w: str) -> None:
    hit = _item_ids(client)["small.png"]
    assert_error(_thumb(client, hit, w), 422, "w:", "32 to 1024", w)


def test_a_width_that_is_no_number_is_a_422(client: httpx.Client) -> None:
    hit = _item_ids(client)["small.png"]
    assert_error(_thumb(client, hit, "wide"), 422, "w")


def test_a_missing_file_is_a_404_and_an_undecodable_one_a_415(client: httpx.Client) -> None:
    hits = _item_ids(client)
    assert_error(_thumb(client, hits["doomed.jpg"], 64), 404, "no file", "doomed.jpg")
    assert_error(client.get(hits["doomed.jpg"]["media_url"]), 404, "no file")
    assert_error(_thumb(client, hits["broken.jpg"], 64), 415, "broken.jpg", "without w")
    # The file itself is still served as it is, for whoever wants it.
    assert client.get(hits["broken.jpg"]["media_url"]).status_code == 200


def test_a_video_item_gets_the_frame_at_its_moment_start(client: httpx.Client) -> None:
    answer = client.post("/v1/collections/videos/search", json={"text": "a ball", "k": 100}).json()
    moments = [hit for hit in answer["hits"] if hit["start_s"]]
    assert moments, "the videos collection has no segment past 0 s"
    for hit in [*moments[:2], next(h for h in answer["hits"] if not h["start_s"])]:
        thumb = _image(_thumb(client, hit, 64))
        frames, fps, _ = read_video(hit["uri"])
        assert thumb.size == (frames.shape[2], frames.shape[1])  # 32 px: never upscaled
        # The thumbnail is the frame at the moment's start: nearer it than any other frame.
        distances = [np.abs(np.asarray(thumb, dtype=np.float64) - frame).mean() for frame in frames]
        start = round((hit["start_s"] or 0.0) * fps)
        assert distances[start] <= min(distances) + 1.0, (start, int(np.argmin(distances)))


# The page ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launched_chromium() as launched:
        yield launched


PAGE_IMAGES = """() => [...document.querySelectorAll('[data-testid="hit"]')].map((hit) => {
    const img = hit.querySelector("img"), link = hit.querySelector('[data-testid="hit-full"]');
    return {id: Number(hit.dataset.id), src: img && img.getAttribute("src"),
            link: link && link.getAttribute("href"), done: !!img && img.complete,
            size: img ? [img.naturalWidth, img.naturalHeight] : null};
})"""


def _page_search(page: Page, url: str, key: str | None = None) -> list[dict[str, Any]]:
    """The photos' hits on the search page at ``url`` (with ``key`` in its key field)."""
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    if key is not None:
        page.get_by_test_id("api-key").fill(key)
        page.get_by_test_id("api-key").press("Enter")
    page.locator('[data-testid="collection"] option[value="photos"]').wait_for(state="attached")
    page.get_by_test_id("collection").select_option("photos")
    page.get_by_test_id("query").fill("a photo")
    page.get_by_test_id("search").click()
    page.wait_for_selector('[data-testid="results"][data-state="done"]')
    # The two files gone or broken since the build show "no preview"; the others load.
    page.wait_for_function(
        f"() => ({PAGE_IMAGES})().filter((hit) => hit.src && hit.done).length === 2"
    )
    return list(page.evaluate(PAGE_IMAGES))


def test_the_page_shows_thumbnails_and_a_click_opens_the_full_file(
    browser: Browser, server: LiveServer, client: httpx.Client
) -> None:
    hits = _item_ids(client)
    sideways = hits["sideways.jpg"]
    context = browser.new_context()
    try:
        page = context.new_page()
        shown = {hit["id"]: hit for hit in _page_search(page, server.url) if hit["src"]}
        assert set(shown) == {sideways["id"], hits["small.png"]["id"]}
        for hit in shown.values():
            media = next(h["media_url"] for h in hits.values() if h["id"] == hit["id"])
            assert hit["src"] == f"{media}?w=256"
            assert hit["link"] == media
        # The page's picture is the upright 256-wide thumbnail, not the 1600x800 stored file.
        assert shown[sideways["id"]]["size"] == [256, 512]

        card = page.locator(f'[data-testid="hit"][data-id="{sideways["id"]}"]')
        with context.expect_page() as opened:
            card.get_by_test_id("hit-full").click()
        full = opened.value
        full.wait_for_load_state()
        assert full.url == f"{server.url}{sideways['media_url']}"
    finally:
        context.close()


def test_with_a_key_the_page_fetches_thumbnails_and_the_full_file_with_it(
    browser: Browser, micro_bundle: Path, photos: tuple[Path, Path]
) -> None:
    settings = Settings(
        bundle=micro_bundle,
        index_root=photos[1],
        collections=["photos"],
        api_keys=KEYS,
        search_requires_key=True,
    )
    with live_server(settings) as keyed:
        context = browser.new_context()
        try:
            page = context.new_page()
            thumbs: list[str] = []
            page.on(
                "request",
                lambda request: (
                    thumbs.append(request.headers.get("x-api-key", ""))
                    if "w=256" in request.url
                    else None
                ),
            )
            shown = [hit for hit in _page_search(page, keyed.url, SEARCH_KEY) if hit["src"]]
            assert len(shown) == 2
            assert all(hit["src"].startswith("blob:") for hit in shown), shown
            assert sorted(hit["size"][0] for hit in shown) == [40, 256]
            assert thumbs
            assert set(thumbs) == {SEARCH_KEY}  # every thumbnail fetched with the key

            card = page.locator(f'[data-testid="hit"][data-id="{shown[0]["id"]}"]')
            with context.expect_page() as opened:
                card.get_by_test_id("hit-full").click()
            full = opened.value
            full.wait_for_url(lambda url: url.startswith("blob:"), wait_until="commit")
            assert full.url.startswith("blob:")
        finally:
            context.close()
