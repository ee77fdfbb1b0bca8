"""``cots bench index updates``: what a change costs on a large collection of segments.

``N synthetic vectors (as bench index faiss draws them) -> one-segment collection ->
add M (time, disk) -> a replica opens the new version beside the old (time, segments loaded)
-> remove M (time, disk) -> search p50 with 1, 10 and 50 segments -> full compaction (time)
-> search p50 on the one compacted segment -> the 10-segment version (held open) and the
compacted one searched side by side, query by query``

The side-by-side pair gives the ratio the goal is checked on: the machine is shared, and two
p50s measured minutes apart drift by more than the difference being measured.

No encoder: an add here is what ``cots index add`` does after encoding (``reserve_numbers``
+ ``add_encoded``), so its time is what the issue's "plus the encoder's time" leaves. Disk is
measured as the bytes under the collection's folder before and after; the added data is the
added vectors as float32 plus their metadata rows as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

import click
import numpy as np
from tqdm import tqdm

from indexer.assemble import write_version
from indexer.collection import Collection
from indexer.compaction import CompactionPolicy, compact_collection
from indexer.faiss_choice import choose_factory
from indexer.index_bundle import IndexInfo, read_info
from indexer.metadata import Item
from indexer.synthetic_vectors import Mixture
from indexer.update import add_encoded, remove_from_collection
from indexer.versions import current_dir, publish, reserve_numbers, staging

NAME: Final = "bench-updates"
SEGMENT_COUNTS: Final = (1, 10, 50)
T = TypeVar("T")


def _items(ids: np.ndarray) -> list[Item]:
    return [
        Item(id=int(i), kind="image", uri=f"bench://{i}", group_id=f"g{i}", metadata={"n": int(i)})
        for i in ids
    ]


def _timed(work: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start


def _disk(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _added_bytes(vectors: np.ndarray, items: list[Item]) -> int:
    return int(vectors.astype(np.float32).nbytes) + sum(len(i.model_dump_json()) for i in items)


def _p50_ms(collections: list[Collection], queries: np.ndarray, k: int) -> list[float]:
    """Median ms of one query at a time through each of ``collections``' ``nearest``, the
    collections taking turns on every query (so drift in the machine's load hits all alike)."""
    for query in queries[:20]:
        for live in collections:
            live.nearest(query[None], k)
    spent: list[list[float]] = [[] for _ in collections]
    for query in queries:
        for live, times in zip(collections, spent, strict=True):
            start = time.perf_counter()
            live.nearest(query[None], k)
            times.append(time.perf_counter() - start)
    return [float(np.median(times) * 1000) for times in spent]


def _search_p50_ms(root: Path, queries: np.ndarray, k: int) -> tuple[float, int]:
    """Median ms of one query at a time on the current version; its segment count."""
    with Collection.open(root, NAME) as live:
        return _p50_ms([live], queries, k)[0], len(live.info.segments)


def run_updates_bench(
    work: Path, count: int, dim: int, changes: int, queries: int, k: int, seed: int
) -> dict[str, Any]:
    root = work / "indices"
    shutil.rmtree(root, ignore_errors=True)
    mixture = Mixture(dim, seed=seed)
    rng = np.random.default_rng(seed)
    bar = tqdm(total=8, desc="bench index updates", unit="step")
    result: dict[str, Any] = {"count": count, "dim": dim, "changes": changes, "k": k}

    vectors = mixture.sample(count, seed=seed + 1)
    factory = choose_factory(count, dim)
    info = IndexInfo(
        collection=NAME, kind="image", modality="image", count=0, live=0, dim=dim,
        factory=factory, model_bundle_id="bench", recall_at_10=0.0, build={},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip

    start = time.perf_counter()
    ids = np.arange(count, dtype=np.int64)
    with staging(root, NAME) as staged:
        write_version(staged, ids, vectors, _items(ids), factory, info)
        publish(root, NAME, staged, keep=3)
    result["build_s"] = time.perf_counter() - start
    del vectors, ids  # a gigabyte at 1M x 256
    result["factory"] = factory
    result["disk_bytes"] = _disk(root / NAME)
    bar.update()

    def add(n: int) -> int:
        fresh = mixture.sample(n, seed=int(rng.integers(2**31)))
        floor = read_info(current_dir(root, NAME)).max_id + 1
        first = reserve_numbers(root, NAME, n, floor)
        ids = np.arange(first, first + n, dtype=np.int64)
        return add_encoded(root, NAME, ids, fresh, _items(ids))

    replica = Collection.open(root, NAME)  # a serving replica, holding the base version
    sample = mixture.sample(changes, seed=seed + 2)
    before = _disk(root / NAME)
    _, result["add_s"] = _timed(lambda: add(changes))
    result["add_disk_bytes"] = _disk(root / NAME) - before
    result["add_data_bytes"] = _added_bytes(sample, _items(np.arange(changes)))
    bar.update()

    swapped, result["replica_swap_s"] = _timed(
        lambda: Collection.open(root, NAME, previous=replica)
    )
    result["replica_loaded_segments"] = len(swapped.loaded)
    _, result["replica_cold_open_s"] = _timed(lambda: Collection.open(root, NAME).close())
    replica.close()
    swapped.close()
    bar.update()

    doomed = rng.choice(count, size=changes, replace=False)
    before = _disk(root / NAME)
    _, result["remove_s"] = _timed(
        lambda: remove_from_collection(root, NAME, ids=[int(i) for i in doomed])
    )
    result["remove_disk_bytes"] = _disk(root / NAME) - before
    bar.update()

    probes = mixture.sample(queries, seed=seed + 3)
    search: dict[str, float] = {}
    ten: Collection | None = None
    for wanted in SEGMENT_COUNTS:
        while len(read_info(current_dir(root, NAME)).segments) < wanted:
            add(changes)
        p50, segments = _search_p50_ms(root, probes, k)
        search[str(segments)] = round(p50, 3)
        if wanted == 10:
            ten = Collection.open(root, NAME)  # held for the side-by-side pair
        bar.update()
    result["search_p50_ms"] = search

    _, result["compact_s"] = _timed(
        lambda: compact_collection(root, NAME, policy=CompactionPolicy(full=True))
    )
    p50, _ = _search_p50_ms(root, probes, k)
    result["search_p50_ms_compacted"] = round(p50, 3)
    result["compacted_factory"] = read_info(current_dir(root, NAME)).factory
    side: dict[str, float] = {}
    if ten is not None:
        with ten, Collection.open(root, NAME) as compacted:
            pair = _p50_ms([ten, compacted], probes, k)
        side = {"10": round(pair[0], 3), "compacted": round(pair[1], 3)}
    result["search_p50_ms_side_by_side"] = side
    bar.update()
    bar.close()
    result["goals"] = {
        "add_s": result["add_s"],
        "add_disk_over_data": round(result["add_disk_bytes"] / result["add_data_bytes"], 2),
        "search_10_over_compacted": round(side["10"] / side["compacted"], 2) if side else None,
        "replica_swap_s": result["replica_swap_s"],
    }
    result["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_1min": round(os.getloadavg()[0], 2),
    }
    return result


@click.command("updates", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--count", type=click.IntRange(min=2000), default=1_000_000, show_default=True,
    help="Vectors in the collection before the changes.",
)  # fmt: skip
@click.option("--dim", type=click.IntRange(min=8), default=256, show_default=True)
@click.option(
    "--changes", type=click.IntRange(min=1), default=1000, show_default=True,
    help="Items per add and per remove.",
)  # fmt: skip
@click.option("--queries", type=click.IntRange(min=10), default=300, show_default=True)
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--work", type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/bench-updates"), show_default=True,
    help="Scratch folder (its collection is rebuilt each run).",
)  # fmt: skip
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def updates_bench(
    count: int,
    dim: int,
    changes: int,
    queries: int,
    k: int,
    seed: int,
    work: Path,
    json_out: Path | None,
) -> None:
    """Add and remove on a large segmented collection: time and disk of a change, a replica's
    swap, search with 1/10/50 segments against one compacted, and the compaction's time."""
    result = run_updates_bench(work, count, dim, changes, queries, k, seed)
    g = result["goals"]
    click.echo(
        f"{count:,} x {dim} vectors ({result['factory']}), changes of {changes:,} items; "
        f"build {result['build_s']:.1f} s, {result['disk_bytes'] / 2**20:,.0f} MiB on disk"
    )
    click.echo("| figure | value | goal |")
    click.echo("|---|---|---|")
    click.echo(f"| add {changes:,} (no encoder) | {result['add_s']:.3f} s | <= 2 s |")
    click.echo(
        f"| disk growth of the add / added data | {result['add_disk_bytes'] / 2**10:,.0f} KiB / "
        f"{result['add_data_bytes'] / 2**10:,.0f} KiB = {g['add_disk_over_data']:.2f}x | <= 2x |"
    )
    click.echo(
        f"| replica swap to the new version (segments loaded: "
        f"{result['replica_loaded_segments']}) | {result['replica_swap_s']:.3f} s | <= 1 s |"
    )
    click.echo(f"| the same version opened cold | {result['replica_cold_open_s']:.3f} s | |")
    click.echo(
        f"| remove {changes:,} | {result['remove_s']:.3f} s, "
        f"{result['remove_disk_bytes'] / 2**10:,.0f} KiB | |"
    )
    for segments, p50 in result["search_p50_ms"].items():
        click.echo(f"| search p50, {segments} segments (k={k}, one query) | {p50:.3f} ms | |")
    click.echo(
        f"| search p50, one compacted segment ({result['compacted_factory']}) | "
        f"{result['search_p50_ms_compacted']:.3f} ms | |"
    )
    side = result["search_p50_ms_side_by_side"]
    if side:
        click.echo(
            f"| side by side, query by query: 10 segments / compacted | {side['10']:.3f} / "
            f"{side['compacted']:.3f} ms = {g['search_10_over_compacted']}x | <= 1.3x |"
        )
    click.echo(f"| full compaction | {result['compact_s']:.1f} s | |")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
