"""The README's "Your own photos" commands, run as a user runs them, on a folder like theirs.

The commands are read from the README's block between the ``own-photos`` markers and run as
subprocesses, changed only where a test must: the folder, the model (``cots-micro`` with
random weights this test saves, for ViT-B-32 and its weights file), a free port, and the
score thresholds. Random weights put every photo close to every other (cosine ~0.97), so the
near-duplicate threshold here is 0.9999 (planted pairs score above 0.99998, distinct photos
at most ~0.9993) and the search's cut-off is taken from the scores the server gives.

Over HTTP it then checks what the issue asks: every media file is an item and the broken one
is counted with its reason; a date filter returns exactly the photos taken in the range; the
sideways photo embeds as its upright copy; ``min_score`` and ``sort``; similar-to-item; the
duplicates; and a sync after deleting 3, adding 5 and modifying 1 file encodes 6 files and is
served without a restart.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.own_media import grid_image, make_photo_folder, save_jpeg
from tests.tools import ROOT, free_port

pytestmark = pytest.mark.slow

MODEL = "cots-micro"
DUPLICATE_SCORE = "0.9999"


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- own-photos -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no <!-- own-photos --> block"
    lines = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line]


def adapt(command: str, folder: Path, weights: Path) -> list[str]:
    """A README command with the test's folder, model and thresholds."""
    command = command.replace("~/Pictures", shlex.quote(str(folder)))
    command = command.replace("ViT-B-32.pt", shlex.quote(str(weights)))
    command = command.replace("ViT-B-32", MODEL).replace("0.97", DUPLICATE_SCORE)
    words = shlex.split(command)
    assert words[0] == "cots", command
    return [sys.executable, "-m", "cots.cli", *words[1:]]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("own-media")


@pytest.fixture(scope="module")
def weights(home: Path) -> Path:
    import open_clip
    import torch

    from model.factory import list_models

    assert MODEL in list_models()
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, force_custom_text=True)
    path = home / "weights.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def environment(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTS_")}
    return env | {
        "COTS_INDEX_ROOT": str(home / "collections"),
        "COTS_URL": f"http://127.0.0.1:{port}",
        "COTS_RELOAD_POLL_S": "0.5",
        "PYTHONPATH": str(ROOT),
    }


def run(command: list[str], home: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        command, cwd=home, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def served(home: Path, weights: Path) -> Iterator[dict[str, Any]]:
    """The folder, and the server the README's quickstart command started on it."""
    folder = home / "Pictures"
    planted = make_photo_folder(folder)
    commands = readme_commands()
    port = free_port()
    env = environment(home, port)
    (quickstart,) = [c for c in commands if c.startswith("cots quickstart")]
    log = (home / "quickstart.log").open("w")
    process = subprocess.Popen(
        [*adapt(quickstart, folder, weights), "--port", str(port)],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert process.poll() is None, (home / "quickstart.log").read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (home / "quickstart.log").read_text()
            time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=60) as http:
            yield {
                "http": http,
                "folder": folder,
                "planted": planted,
                "commands": commands,
                "env": env,
                "home": home,
                "weights": weights,
                "log": home / "quickstart.log",
            }
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def search(http: httpx.Client, collection: str = "photos", **body: Any) -> dict[str, Any]:
    response = http.post(f"/v1/collections/{collection}/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def all_items(http: httpx.Client, collection: str = "photos") -> list[dict[str, Any]]:
    """Every live item: a search with any vector over the exact (Flat) index of a small
    collection returns all of them."""
    dim = http.get(f"/v1/collections/{collection}").json()["dim"]
    return search(http, collection, embedding=[1.0] * dim, k=1000)["hits"]  # type: ignore[no-any-return]


def paths(hits: list[dict[str, Any]]) -> set[str]:
    return {hit["metadata"]["path"] for hit in hits}


def test_every_media_file_is_an_item(served: dict[str, Any]) -> None:
    http, planted = served["http"], served["planted"]
    assert sorted(paths(all_items(http))) == sorted(planted.photos)
    videos = [hit for hit in all_items(http, "photos-videos") if hit["kind"] == "video"]
    assert sorted(paths(videos)) == sorted(planted.videos)
    info = run(
        [sys.executable, "-m", "cots.cli", "index", "info", "--collection", "photos", "--json"],
        served["home"],
        served["env"],
    )
    assert json.loads(info)["skipped"] == {"corrupt image": 1, "hidden": 1, "not media": 1}
    log = served["log"].read_text()
    assert "images" in log, log
    assert "not media" in log, log


def test_date_filter_returns_exactly_the_range(served: dict[str, Any]) -> None:
    http, planted = served["http"], served["planted"]
    dim = http.get("/v1/collections/photos").json()["dim"]
    body = {"taken": {"gte": "2024-01-01", "lt": "2024-07-01"}}
    hits = search(http, embedding=[1.0] * dim, k=1000, filters=body)["hits"]
    expected = {p for p, taken in planted.taken.items() if "2024-01-01" <= taken < "2024-07-01"}
    assert expected
    assert paths(hits) == expected
    folder = search(http, embedding=[1.0] * dim, k=1000, filters={"folder": "holidays/2024"})
    assert paths(folder["hits"]) == {p for p in planted.photos if p.startswith("holidays/2024/I")}


def by_path(http: httpx.Client) -> dict[str, int]:
    return {hit["metadata"]["path"]: hit["id"] for hit in all_items(http)}


def test_sideways_photo_embeds_as_its_upright_copy(served: dict[str, Any]) -> None:
    http, planted = served["http"], served["planted"]
    ids = by_path(http)
    hits = search(http, similar_to=ids[planted.rotated], k=3)["hits"]
    assert hits[0]["metadata"]["path"] == planted.upright
    assert hits[0]["score"] > 0.99999
    assert ids[planted.rotated] not in {hit["id"] for hit in hits}
    rotated = next(h for h in all_items(http) if h["metadata"]["path"] == planted.rotated)
    assert (rotated["metadata"]["width"], rotated["metadata"]["height"]) == (96, 72)


def test_similar_to_item_finds_its_near_duplicate_first(served: dict[str, Any]) -> None:
    http, planted = served["http"], served["planted"]
    ids = by_path(http)
    for source, copy in planted.duplicates:
        hits = search(http, similar_to=ids[source], k=5)["hits"]
        assert hits[0]["metadata"]["path"] == copy
        assert ids[source] not in {hit["id"] for hit in hits}


def test_min_score_and_sort(served: dict[str, Any]) -> None:
    http = served["http"]
    ranked = search(http, text="a photo of the beach", k=40)["hits"]
    cut = ranked[24]["score"]
    above = [hit for hit in ranked if hit["score"] >= cut]
    page = search(http, text="a photo of the beach", k=100, min_score=cut)
    assert [hit["id"] for hit in page["hits"]] == [hit["id"] for hit in above]
    assert page["next_offset"] is None
    ordered = search(http, text="a photo of the beach", k=100, min_score=cut, sort="-taken")
    assert {hit["id"] for hit in ordered["hits"]} == {hit["id"] for hit in above}
    dated = [hit["metadata"]["taken"] for hit in ordered["hits"] if "taken" in hit["metadata"]]
    assert dated == sorted(dated, reverse=True)
    assert all("taken" in hit["metadata"] for hit in ordered["hits"][: len(dated)])
    # The README's terminal search, with this model's cut-off for the README's.
    (command,) = [c for c in served["commands"] if c.startswith("cots search")]
    command = re.sub(r"--min-score [0-9.]+", f"--min-score {cut}", command)
    out = run(
        [*adapt(command, served["folder"], served["weights"]), "--json"],
        served["home"],
        served["env"],
    )
    answer = json.loads(out)
    assert answer["hits"]
    assert all(hit["score"] >= cut for hit in answer["hits"])


def test_duplicates_command_finds_the_planted_pairs(served: dict[str, Any]) -> None:
    planted = served["planted"]
    (command,) = [c for c in served["commands"] if c.startswith("cots index duplicates")]
    out = run(
        [*adapt(command, served["folder"], served["weights"]), "--json"],
        served["home"],
        served["env"],
    )
    groups = json.loads(out)["groups"]
    folder = served["folder"]
    found = {
        frozenset(Path(item["uri"]).relative_to(folder).as_posix() for item in group["items"])
        for group in groups
    }
    assert found == {frozenset(pair) for pair in planted.duplicates}


def test_sync_after_changes(served: dict[str, Any]) -> None:
    """Runs last (file order): it changes the folder the other tests read."""
    http, folder, planted = served["http"], served["folder"], served["planted"]
    before = http.get("/v1/collections/photos").json()["version"]
    rng = np.random.default_rng(99)
    doomed = planted.photos[10:13]
    for relpath in doomed:
        (folder / relpath).unlink()
    added = [f"new/2025/IMG_{n}.jpg" for n in range(5)]
    for relpath in added:
        save_jpeg(grid_image(rng), folder / relpath, datetime(2025, 1, 2), ("Apple", "iPhone 15"))
    modified = planted.photos[20]
    save_jpeg(grid_image(rng), folder / modified, datetime(2025, 2, 3), ("Apple", "iPhone 15"))
    (command,) = [c for c in served["commands"] if c.startswith("cots index sync")]
    out = run(adapt(command, folder, served["weights"]), served["home"], served["env"])
    assert re.search(r"\bencoded 6 files\b", out), out
    expected = (set(planted.photos) - set(doomed)) | set(added)
    deadline = time.monotonic() + 30
    while http.get("/v1/collections/photos").json()["version"] == before:
        assert time.monotonic() < deadline, "the server did not load the synced version"
        time.sleep(0.2)
    items = all_items(http)
    assert paths(items) == expected
    changed = next(hit for hit in items if hit["metadata"]["path"] == modified)
    assert changed["metadata"]["taken"] == "2025-02-03T00:00:00"


def test_demo_hint_shows_the_readme_commands() -> None:
    from cots.demo import OWN_PHOTOS_COMMANDS

    assert list(OWN_PHOTOS_COMMANDS) == readme_commands()
