"""Writes the synthetic corpus: PNG images, mp4 videos, CSV indexes and ``dataset.json``.

Every item is rendered from its own random stream, seeded by (seed, kind, index), so the bytes
depend on the seed alone, not on the number of worker processes or their scheduling.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from model.data.synth.drawing import render_scene
from model.data.synth.scenes import Scene, caption_scene, sample_scene
from model.data.synth.videos import EVENTS, caption_event, render_event, sample_event, write_mp4
from model.data.synth.vocabulary import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ColourShape,
    all_combinations,
    choose_heldout_combinations,
)

FORMAT: Final = "cots-synthetic"
FORMAT_VERSION: Final = 1
IMAGES_CSV: Final = "images.csv"
VIDEOS_CSV: Final = "videos.csv"
DATASET_JSON: Final = "dataset.json"
IMAGE_COLUMNS: Final = ("filepath", "caption", "image_id", "split")
VIDEO_COLUMNS: Final = ("filepath", "caption", "video_id", "split")
_ITEMS_PER_FOLDER: Final = 1000
_IMAGE_STREAM, _VIDEO_STREAM = 1, 2


class SynthConfig(BaseModel):
    """Everything that determines the corpus bytes (the worker count does not)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, ge=0, description="Random seed; the same seed gives the same bytes.")
    n_images: int = Field(10_000, ge=0, le=10_000_000, description="Number of images.")
    n_videos: int = Field(1_000, ge=0, le=1_000_000, description="Number of videos.")
    image_size: int = Field(64, ge=16, le=1024, description="Image side in pixels.")
    video_size: int = Field(64, ge=16, le=512, description="Video frame side (even).")
    video_frames: int = Field(16, ge=2, le=512, description="Frames per video.")
    video_fps: int = Field(8, ge=1, le=60, description="Video frame rate.")
    max_captions: int = Field(5, ge=1, le=5, description="Captions per image: 1 to this.")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.10, ge=0.0, lt=1.0)
    heldout_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    n_heldout_combinations: int = Field(8, ge=0, le=8)

    @model_validator(mode="after")
    def _check(self) -> SynthConfig:
        if self.val_fraction + self.test_fraction + self.heldout_fraction >= 1.0:
            raise ValueError("val + test + heldout fractions must leave room for a train split")
        if self.video_size % 2:
            raise ValueError(f"video_size must be even for H.264 (yuv420p), got {self.video_size}")
        if self.heldout_fraction > 0 and self.n_heldout_combinations == 0:
            raise ValueError("a held-out split needs n_heldout_combinations > 0")
        return self


def assign_splits(n: int, seed: int, stream: int, fractions: dict[str, float]) -> list[str]:
    """A split name per item; the counts are rounded fractions, the rest is train."""
    counts = {name: round(n * fraction) for name, fraction in fractions.items()}
    names = [name for name, count in counts.items() for _ in range(count)]
    names += ["train"] * (n - len(names))
    order = np.random.default_rng([seed, stream, 0]).permutation(n)
    return [names[int(i)] for i in np.argsort(order)]


def _item_path(folder: str, index: int, suffix: str) -> str:
    return f"{folder}/{index // _ITEMS_PER_FOLDER:04d}/{index:07d}{suffix}"


@dataclass(frozen=True)
class _ImageTask:
    root: Path
    index: int
    split: str
    config: SynthConfig
    allowed: list[ColourShape]
    heldout: list[ColourShape]


@dataclass(frozen=True)
class _VideoTask:
    root: Path
    index: int
    split: str
    config: SynthConfig


def _image_scene(task: _ImageTask) -> tuple[np.random.Generator, Scene]:
    """The item's random stream and its scene, drawn first from that stream."""
    rng = np.random.default_rng([task.config.seed, _IMAGE_STREAM, task.index])
    if task.split == "heldout":
        return rng, sample_scene(rng, all_combinations(), required=task.heldout)
    return rng, sample_scene(rng, task.allowed)


def _make_image(task: _ImageTask) -> tuple[str, list[str]]:
    rng, scene = _image_scene(task)
    pixels = render_scene(rng, scene, task.config.image_size)
    captions = caption_scene(rng, scene, int(rng.integers(1, task.config.max_captions + 1)))
    relpath = _item_path("images", task.index, ".png")
    Image.fromarray(pixels).save(task.root / relpath, compress_level=6)
    return relpath, captions


def _make_video(task: _VideoTask) -> tuple[str, list[str]]:
    config = task.config
    rng = np.random.default_rng([config.seed, _VIDEO_STREAM, task.index])
    event = sample_event(rng)
    frames = render_event(rng, event, config.video_size, config.video_frames)
    captions = caption_event(rng, event, int(rng.integers(1, 4)))
    relpath = _item_path("videos", task.index, ".mp4")
    write_mp4(task.root / relpath, frames, config.video_fps)
    return relpath, captions


def _run_parallel(
    fn: Callable[[Any], tuple[str, list[str]]],
    tasks: list[Any],
    workers: int,
    desc: str,
    unit: str,
    progress: bool,
) -> Iterator[tuple[str, list[str]]]:
    bar = tqdm(total=len(tasks), desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
    with bar:
        if workers <= 1 or len(tasks) < 2:
            results: Iterable[tuple[str, list[str]]] = map(fn, tasks)
            for result in results:
                bar.update()
                yield result
            return
        # Spawned, not forked: a fork copies whatever state the caller holds into the workers,
        # and the caller may be any program (a test runner, a server). Signal handlers that do
        # not exit (RQ's warm shutdown, say) made Pool.terminate's SIGTERM a no-op in forked
        # workers and its join hang; locks held by other threads at fork time never unlock.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(fn, tasks, chunksize=32):
                bar.update()
                yield result


def _write_index(
    path: Path,
    columns: tuple[str, ...],
    id_prefix: str,
    splits: list[str],
    results: Iterable[tuple[str, list[str]]],
) -> dict[str, Any]:
    """Write the CSV index (one row per caption, in item order) and describe it."""
    n_captions = 0
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for i, (relpath, captions) in enumerate(results):
            for caption in captions:
                writer.writerow((relpath, caption, f"{id_prefix}{i:07d}", splits[i]))
                n_captions += 1
    return {
        "csv": path.name,
        "columns": dict(zip(("filepath", "caption", "group", "split"), columns, strict=True)),
        "count": len(splits),
        "captions": n_captions,
        "splits": dict(sorted(Counter(splits).items())),
    }


def _make_folders(root: Path, folder: str, n: int) -> None:
    for shard in range((n + _ITEMS_PER_FOLDER - 1) // _ITEMS_PER_FOLDER):
        (root / folder / f"{shard:04d}").mkdir(parents=True, exist_ok=True)


def _image_tasks(root: Path, config: SynthConfig, heldout: list[ColourShape]) -> list[_ImageTask]:
    splits = assign_splits(
        config.n_images,
        config.seed,
        _IMAGE_STREAM,
        {
            "val": config.val_fraction,
            "test": config.test_fraction,
            "heldout": config.heldout_fraction,
        },
    )
    allowed = [pair for pair in all_combinations() if pair not in heldout]
    return [_ImageTask(root, i, split, config, allowed, heldout) for i, split in enumerate(splits)]


def image_scenes(config: SynthConfig) -> list[tuple[str, Scene]]:
    """(split, scene) of every image of the corpus ``config`` describes, in image order,
    recomputed from the seed without rendering: the ground truth behind each caption."""
    heldout = choose_heldout_combinations(config.seed, config.n_heldout_combinations)
    return [(task.split, _image_scene(task)[1]) for task in _image_tasks(Path(), config, heldout)]


def _generate_images(
    root: Path, config: SynthConfig, heldout: list[ColourShape], workers: int, progress: bool
) -> dict[str, Any]:
    tasks = _image_tasks(root, config, heldout)
    splits = [task.split for task in tasks]
    _make_folders(root, "images", config.n_images)
    results = _run_parallel(_make_image, tasks, workers, "images", "img", progress)
    described = _write_index(root / IMAGES_CSV, IMAGE_COLUMNS, "img", splits, results)
    return {**described, "size": config.image_size}


def _generate_videos(
    root: Path, config: SynthConfig, workers: int, progress: bool
) -> dict[str, Any]:
    splits = assign_splits(
        config.n_videos,
        config.seed,
        _VIDEO_STREAM,
        {"val": config.val_fraction, "test": config.test_fraction},
    )
    tasks = [_VideoTask(root, i, split, config) for i, split in enumerate(splits)]
    _make_folders(root, "videos", config.n_videos)
    results = _run_parallel(_make_video, tasks, workers, "videos", "video", progress)
    described = _write_index(root / VIDEOS_CSV, VIDEO_COLUMNS, "vid", splits, results)
    return {
        **described,
        "size": config.video_size,
        "frames": config.video_frames,
        "fps": config.video_fps,
        "codec": "h264",
        "events": list(EVENTS),
    }


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def read_dataset_json(out_dir: Path) -> dict[str, Any] | None:
    """The description of a finished corpus in ``out_dir``, or None if there is none."""
    path = Path(out_dir) / DATASET_JSON
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def generate_corpus(
    out_dir: Path,
    config: SynthConfig | None = None,
    *,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Render the corpus into ``out_dir`` and return the content of its ``dataset.json``.

    The corpus is written to a sibling ``.partial`` folder and moved into place at the end,
    so an interrupted run never leaves something that looks like a finished corpus.
    """
    config = config or SynthConfig()
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not empty; choose another folder or pass overwrite=True"
        )
    workers = max(1, workers or default_workers())
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    started = time.perf_counter()
    heldout = choose_heldout_combinations(config.seed, config.n_heldout_combinations)
    images = _generate_images(partial, config, heldout, workers, progress)
    videos = _generate_videos(partial, config, workers, progress)
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": config.model_dump(),
        "images": images,
        "videos": videos,
        "heldout_combinations": [list(pair) for pair in heldout],
        "vocabulary": {
            "shapes": list(SHAPES),
            "colours": list(COLOURS),
            "sizes": list(SIZES),
            "positions": list(POSITIONS.values()),
            "relations": list(RELATIONS),
            "backgrounds": list(BACKGROUNDS),
        },
    }
    (partial / DATASET_JSON).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial.rename(out_dir)
    # Timing goes to the caller, not dataset.json, which must be byte-identical across runs.
    return {**description, "elapsed_s": round(time.perf_counter() - started, 2)}
