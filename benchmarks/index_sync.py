"""``cots bench index sync``: what keeping a large folder in sync costs.

    generate N small photos (nested folders of 1,000) ──► first sync (a build from the folder)
      ──► re-sync, nothing changed (goal: under 10 s at 100,000 files: stat only)
      ──► add 1,000 photos, sync ──┐ side by side, same process, same files
          Encoder.encode_images ◄──┘ (decode, preprocess, encode: the encoder's own time)
                                     goal: sync / encoder ≤ 1.2

The photos are 64 px JPEGs of random colour grids, written once per ``--work`` folder and
reused by later runs (a marker file records how many). The added 1,000 are removed again at
the end, so a second run measures the same thing.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import numpy as np
from PIL import Image
from tqdm import tqdm

PER_FOLDER = 1000
ADDED = "added"


def write_photos(folder: Path, count: int, seed: int, start: int = 0) -> list[Path]:
    """``count`` 64 px JPEGs in subfolders of :data:`PER_FOLDER`."""
    rng = np.random.default_rng(seed)
    paths = []
    for number in tqdm(range(start, start + count), desc="writing photos", unit="file"):
        path = folder / f"{number // PER_FOLDER:04d}" / f"IMG_{number:06d}.jpg"
        if number % PER_FOLDER == 0 or number == start:
            path.parent.mkdir(parents=True, exist_ok=True)
        cells = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(cells).resize((64, 64), Image.Resampling.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def _photos(work: Path, count: int, seed: int) -> Path:
    folder = work / "photos"
    marker = work / "photos.count"
    if marker.is_file() and marker.read_text().strip() == str(count):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    write_photos(folder, count, seed)
    marker.write_text(f"{count}\n")
    return folder


def _timed_sync(root: Path, folder: Path, bundle: Path, workers: int) -> dict[str, Any]:
    from indexer.sync import sync_collection

    started = time.perf_counter()
    report = sync_collection(root, "photos", folder, kind="image", bundle=bundle, workers=workers)
    seconds = time.perf_counter() - started
    click.echo(f"  {report.summary()}")
    return {"seconds": round(seconds, 3), **report.model_dump(exclude={"seconds"})}


def run_sync_bench(
    work: Path, bundle: Path, count: int, added: int, workers: int, seed: int
) -> dict[str, Any]:
    from runtime.encoder import Encoder

    work.mkdir(parents=True, exist_ok=True)
    folder = _photos(work, count, seed)
    root = work / "collections"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(folder / ADDED, ignore_errors=True)
    result: dict[str, Any] = {
        "command": "cots bench index sync",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "hardware": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_at_start": os.getloadavg()[0],
        "files": count,
        "added": added,
        "workers": workers,
        "bundle": str(bundle),
    }
    click.echo(f"first sync of {count:,} files")
    result["first"] = _timed_sync(root, folder, bundle, workers)
    click.echo("re-sync, nothing changed")
    result["unchanged"] = _timed_sync(root, folder, bundle, workers)
    new = write_photos(folder / ADDED, added, seed + 1, start=count)
    encoder = Encoder(bundle, verify=False)
    encoder.encode_images(new[:64])  # warm: sessions and thread pools, as the sync's are
    click.echo(f"add {added:,} files: the encoder alone, then the sync")
    started = time.perf_counter()
    encoder.encode_images(new)
    result["encoder_s"] = round(time.perf_counter() - started, 3)
    result["add"] = _timed_sync(root, folder, bundle, workers)
    result["goals"] = {
        "unchanged_s": result["unchanged"]["seconds"],
        "add_over_encoder": round(result["add"]["seconds"] / result["encoder_s"], 3),
    }
    shutil.rmtree(folder / ADDED, ignore_errors=True)
    return result


@click.command("sync", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--bundle", type=click.Path(file_okay=False, exists=True, path_type=Path), required=True,
    help="Model bundle that embeds the photos.",
)  # fmt: skip
@click.option("--files", "count", type=click.IntRange(min=1000), default=100_000, show_default=True)
@click.option("--added", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--work", type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/bench-sync"), show_default=True,
    help="Scratch folder: the photos (kept for the next run) and the collection (rebuilt).",
)  # fmt: skip
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def sync_bench(
    bundle: Path,
    count: int,
    added: int,
    workers: int,
    seed: int,
    work: Path,
    json_out: Path | None,
) -> None:
    """A folder of --files photos: the first sync, an unchanged re-sync and a sync after
    adding --added photos, against the encoder alone on those photos."""
    result = run_sync_bench(work, bundle, count, added, workers, seed)
    goals = result["goals"]
    click.echo("| step | seconds | files encoded | goal |")
    click.echo("|---|---|---|---|")
    first = result["first"]
    click.echo(
        f"| first sync, {count:,} files | {first['seconds']:.1f} "
        f"({count / first['seconds']:.0f} files/s) | {first['encoded']:,} | |"
    )
    click.echo(
        f"| re-sync, nothing changed | {result['unchanged']['seconds']:.2f} | "
        f"{result['unchanged']['encoded']} | < 10 s |"
    )
    click.echo(f"| encoder alone, {added:,} new files | {result['encoder_s']:.2f} | {added:,} | |")
    click.echo(
        f"| sync after adding {added:,} | {result['add']['seconds']:.2f} | "
        f"{result['add']['encoded']:,} | ≤ 1.2x encoder: {goals['add_over_encoder']:.2f}x |"
    )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
