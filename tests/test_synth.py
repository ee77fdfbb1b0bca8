"""The synthetic corpus: determinism, splits, held-out combinations, captions true to pixels."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data.synth import SynthConfig, generate_corpus
from model.data.synth.videos import MOVE_PHRASES
from model.data.synth.vocabulary import COLOURS, RELATION_PHRASES
from tests.captions import colour_shape_pairs, objects_in

SMALL = SynthConfig(seed=3, n_images=120, n_videos=8, video_frames=8)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "corpus"
    generate_corpus(out, SynthConfig(seed=7, n_images=600, n_videos=30), workers=2)
    return out


def test_same_seed_same_bytes_whatever_the_worker_count(tmp_path: Path) -> None:
    generate_corpus(tmp_path / "a", SMALL, workers=1)
    generate_corpus(tmp_path / "b", SMALL, workers=2)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert len(a) == 120 + 8 + 3  # images, videos, two CSVs and dataset.json
    assert a == b


def test_different_seed_different_corpus(tmp_path: Path) -> None:
    generate_corpus(tmp_path / "a", SMALL, workers=2)
    generate_corpus(tmp_path / "b", SMALL.model_copy(update={"seed": 4}), workers=2)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a.keys() == b.keys()
    differing = [name for name in a if a[name] != b[name]]
    assert "images.csv" in differing
    assert "videos.csv" in differing
    assert sum(name.endswith(".png") for name in differing) == 120
    assert sum(name.endswith(".mp4") for name in differing) == 8


def test_layout_csv_header_and_dataset_json(corpus: Path) -> None:
    with (corpus / "images.csv").open(encoding="utf-8") as f:
        assert f.readline().strip() == "filepath,caption,image_id,split"
    with (corpus / "videos.csv").open(encoding="utf-8") as f:
        assert f.readline().strip() == "filepath,caption,video_id,split"
    description = json.loads((corpus / "dataset.json").read_text())
    assert description["config"]["seed"] == 7
    assert description["images"]["count"] == 600
    assert description["images"]["splits"] == {"heldout": 30, "test": 60, "train": 480, "val": 30}
    assert sum(description["videos"]["splits"].values()) == 30
    rows = read_rows(corpus / "images.csv")
    assert description["images"]["captions"] == len(rows)
    for row in rows:
        assert (corpus / row["filepath"]).is_file()
    first = Image.open(corpus / rows[0]["filepath"])
    assert first.size == (64, 64)
    assert first.mode == "RGB"


def test_one_to_five_captions_per_image_sharing_an_image_id(corpus: Path) -> None:
    by_image: dict[str, set[str]] = defaultdict(set)
    ids: dict[str, set[str]] = defaultdict(set)
    for row in read_rows(corpus / "images.csv"):
        by_image[row["filepath"]].add(row["caption"])
        ids[row["filepath"]].add(row["image_id"])
    counts = [len(captions) for captions in by_image.values()]
    assert len(by_image) == 600
    assert min(counts) == 1
    assert max(counts) == 5
    assert all(len(v) == 1 for v in ids.values())
    assert len({next(iter(v)) for v in ids.values()}) == 600


def test_heldout_split_holds_out_its_colour_shape_pairs(corpus: Path) -> None:
    description = json.loads((corpus / "dataset.json").read_text())
    heldout = {tuple(pair) for pair in description["heldout_combinations"]}
    assert len(heldout) == 8
    assert len({c for c, _ in heldout}) == 8
    assert len({s for _, s in heldout}) == 8
    seen_in_heldout: set[tuple[str, str]] = set()
    for row in read_rows(corpus / "images.csv"):
        pairs = colour_shape_pairs(row["caption"])
        assert pairs, row["caption"]
        if row["split"] == "heldout":
            assert pairs & heldout, f"held-out caption without a held-out pair: {row['caption']}"
            seen_in_heldout |= pairs & heldout
        else:
            assert not pairs & heldout, f"{row['split']} caption uses a held-out pair: {row}"
    assert len(seen_in_heldout) >= 6  # the split exercises most held-out pairs, not one


def test_every_caption_of_an_image_names_the_same_complete_objects(corpus: Path) -> None:
    by_image: dict[str, list[str]] = defaultdict(list)
    for row in read_rows(corpus / "images.csv"):
        by_image[row["filepath"]].append(row["caption"])
    n_objects: dict[int, int] = defaultdict(int)
    for captions in by_image.values():
        objects = [objects_in(c) for c in captions]
        assert all(o == objects[0] for o in objects), captions
        assert 1 <= len(objects[0]) <= 3, captions
        # colour-shape pairs are unique within a scene, so references are unambiguous
        assert len({(c, s) for _, c, s in objects[0]}) == len(objects[0])
        n_objects[len(objects[0])] += 1
    assert set(n_objects) == {1, 2, 3}


def _colour_centroid(pixels: np.ndarray, colour: str) -> tuple[float, float] | None:
    distance = np.linalg.norm(pixels.astype(np.float32) - np.array(COLOURS[colour]), axis=-1)
    ys, xs = np.nonzero(distance < 30)
    if len(xs) < 4:
        return None
    return float(xs.mean()), float(ys.mean())


_REL = {phrase: rel for rel, phrases in RELATION_PHRASES.items() for phrase in phrases}
_TWO = re.compile(
    r"^(?:there is )?(?P<a>.+?) (?P<rel>" + "|".join(sorted(_REL, key=len, reverse=True)) + r") "
    r"(?P<b>an? .+?)(?:, on .* background)?$"
)


def test_captions_are_true_to_the_pixels(corpus: Path) -> None:
    """Mentioned colours are present, and stated left/right/above/below relations hold."""
    checked_relations = 0
    for row in read_rows(corpus / "images.csv"):
        pixels = np.asarray(Image.open(corpus / row["filepath"]).convert("RGB"))
        objects = objects_in(row["caption"])
        for _, colour, _ in objects:
            assert _colour_centroid(pixels, colour) is not None, (colour, row)
        match = _TWO.match(row["caption"])
        colours = [c for _, c, _ in objects]
        if len(objects) != 2 or not match or len(set(colours)) != 2:
            continue
        ((_, colour_a, _),) = objects_in(match["a"])
        ((_, colour_b, _),) = objects_in(match["b"])
        xa, ya = _colour_centroid(pixels, colour_a)  # type: ignore[misc]
        xb, yb = _colour_centroid(pixels, colour_b)  # type: ignore[misc]
        relation = _REL[match["rel"]]
        holds = {
            "left of": xa < xb,
            "right of": xa > xb,
            "above": ya < yb,
            "below": ya > yb,
        }[relation]
        assert holds, (row["caption"], (xa, ya), (xb, yb))
        checked_relations += 1
    assert checked_relations >= 50


def test_video_captions_follow_time_order(corpus: Path) -> None:
    """A video captioned as moving right has its object further right at the end, and back."""
    from runtime.video_decode import read_video

    checked = 0
    for row in read_rows(corpus / "videos.csv"):
        caption = row["caption"]
        direction = next(
            (
                event
                for event in ("moves right", "moves left")
                for phrase in MOVE_PHRASES[event]
                if phrase in caption
            ),
            None,
        )
        if direction is None:
            continue
        colour = caption.split()[2]
        frames, fps, duration = read_video(corpus / row["filepath"])
        assert frames.shape == (16, 64, 64, 3)
        assert fps == 8
        assert duration == pytest.approx(2.0)
        # mp4 colours pass through yuv420p, so the tolerance is wider than for PNGs
        start, end = (_centroid_loose(frames[i], colour) for i in (0, -1))
        moved_right = end[0] > start[0] + 10
        assert moved_right == (direction == "moves right"), (caption, start, end)
        checked += 1
    assert checked >= 4


def _centroid_loose(pixels: np.ndarray, colour: str) -> tuple[float, float]:
    distance = np.linalg.norm(pixels.astype(np.float32) - np.array(COLOURS[colour]), axis=-1)
    ys, xs = np.nonzero(distance < 60)
    assert len(xs) >= 4
    return float(xs.mean()), float(ys.mean())


def test_refuses_to_overwrite_and_leaves_no_partial(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        generate_corpus(out, SMALL)
    assert (out / "keep.txt").read_text() == "user data"
    generate_corpus(out, SMALL, overwrite=True, workers=2)
    assert not (tmp_path / "corpus.partial").exists()
    assert (out / "dataset.json").is_file()
    assert not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"video_size": 63}, "even"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "train split"),
        ({"n_images": -1}, "greater than or equal"),
        ({"colour": "red"}, "Extra inputs"),
    ],
)
def test_bad_config_is_refused_with_a_reason(update: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SynthConfig(**update)


# A process whose SIGTERM and SIGINT handlers do not exit, as RQ's worker leaves them: with a
# forked pool the workers inherited them, Pool.terminate's SIGTERM did nothing and join hung.
_UNKILLABLE_PARENT = """
import signal, sys
from pathlib import Path
from model.data.synth import SynthConfig, generate_corpus

def keep_running(number, frame):
    print("ignored signal", number, file=sys.stderr)

signal.signal(signal.SIGTERM, keep_running)
signal.signal(signal.SIGINT, keep_running)
config = SynthConfig(seed=5, n_images=64, n_videos=4, video_frames=8)
for run in range(int(sys.argv[2])):
    generate_corpus(Path(sys.argv[1]) / str(run), config, workers=2, progress=False)

# A consumer that stops early (a failed write, say) terminates the pool while its workers are
# busy; a forked worker then ignored the SIGTERM and waited for the task queue's lock forever.
from model.data.synth.generate import _run_parallel
import time
results = _run_parallel(time.sleep, [0.02] * 200, 2, "tasks", "task", False)
next(results)
results.close()
print("done")
"""
# Finished runs hung the forked pool about one time in seven (a race of sentinels and SIGTERM).
_RUNS = 12


def test_generator_finishes_in_a_process_whose_signal_handlers_do_not_exit(
    tmp_path: Path,
) -> None:
    command = [sys.executable, "-c", _UNKILLABLE_PARENT, str(tmp_path), str(_RUNS)]
    # In a session of its own, so that a time-out kills the pool's workers too (they hold the
    # pipes open), with SIGKILL: the child ignores SIGTERM by design.
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as child:
        try:
            out, err = child.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            out, err = child.communicate()
            pytest.fail(f"the generator hung in a process whose handlers do not exit: {err}")
    assert child.returncode == 0, err[-2000:]
    assert out.strip() == "done"
    for run in range(_RUNS):
        assert len({row["image_id"] for row in read_rows(tmp_path / str(run) / "images.csv")}) == 64
