"""Recall@10 and speed of compressed segments rescored exactly (``indexer.rescore``).

``python -m benchmarks.index_rescore --count 100000 --dim 256``: for each memory budget, the
factory ``choose_factory`` picks under it is written as a real segment (``write_segment``:
fp16 stored vectors, metadata) and opened as the service opens it (memory-mapped); then
queries go through ``SegmentedIndex.nearest`` with ``rescore`` r in 1, 2, 4, 8, 16. Vectors and
queries come from ``indexer.synthetic_vectors.Mixture`` (as ``benchmarks/index_faiss.py``);
recall@10 is against exact search over the float32 originals. ``DEFAULT_RESCORE`` is the
smallest r whose IVF-PQ recall@10 reaches 0.95.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Final

import click
import faiss
import numpy as np
from tqdm import tqdm

from indexer.faiss_choice import choose_factory, estimate_memory_bytes
from indexer.faiss_search import exact_search, recall_of
from indexer.metadata import Item
from indexer.segments import Segment, SegmentedIndex, write_segment
from indexer.synthetic_vectors import Mixture

FACTORS: Final = (1, 2, 4, 8, 16)
BATCH: Final = 64


def measure(
    database: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    expected: np.ndarray,
    factory: str,
    folder: Path,
    factors: tuple[int, ...] = FACTORS,
) -> list[dict[str, Any]]:
    """One row per factor r: recall@10 and batch-64 QPS of ``factory`` served with rescore r."""
    items = [Item(id=int(i), kind="image", uri=f"{i}.png", group_id=str(i)) for i in ids]
    start = time.perf_counter()
    write_segment(folder, ids, database, items, factory)
    build_s = time.perf_counter() - start
    segment = Segment(folder, mmap=True)
    index = SegmentedIndex([segment], np.zeros(0, np.int64))
    rows = []
    for factor in factors:
        index.nearest(queries[:BATCH], 10, rescore=factor)  # warm the page cache
        start = time.perf_counter()
        found = [
            index.nearest(queries[i : i + BATCH], 10, rescore=factor)[1]
            for i in range(0, len(queries), BATCH)
        ]
        seconds = time.perf_counter() - start
        rows.append(
            {
                "size": len(ids),
                "factory": factory,
                "index_bytes": (folder / "index.faiss").stat().st_size,
                "memory_estimate_bytes": estimate_memory_bytes(
                    factory, len(ids), database.shape[1]
                ),
                "build_s": round(build_s, 1),
                "rescore": factor,
                "recall_at_10": round(recall_of(np.concatenate(found), expected), 4),
                "qps_batch64": round(len(queries) / seconds),
            }
        )
        tqdm.write(json.dumps(rows[-1]))
    segment.close()
    return rows


@click.command()
@click.option("--count", type=int, default=100_000, show_default=True)
@click.option("--dim", type=int, default=256, show_default=True)
@click.option(
    "--budgets-mib",
    default="8,16,64",
    show_default=True,
    help="Memory budgets (MiB), each giving the factory choose_factory picks under it.",
)
@click.option("--queries", "query_count", type=int, default=1000, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def main(
    count: int,
    dim: int,
    budgets_mib: str,
    query_count: int,
    threads: int,
    seed: int,
    json_out: Path | None,
) -> None:
    """Recall@10 and QPS of compressed indexes with exact rescoring of k x r candidates."""
    faiss.omp_set_num_threads(threads)
    load_start = os.getloadavg()[0]
    mixture = Mixture(dim, seed=seed)
    queries = mixture.sample(query_count, seed=seed + 1)
    database = mixture.sample(count, seed=seed + 2)
    ids = np.arange(count, dtype=np.int64) * 7 + 1_000_000_007
    _, expected = exact_search(database, queries, 10, ids=ids)
    factories = [choose_factory(count, dim, int(float(b) * 2**20)) for b in budgets_mib.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for n, factory in enumerate(dict.fromkeys(factories)):
            rows += measure(database, ids, queries, expected, factory, Path(scratch) / str(n))
    click.echo(
        f"\n{count:,} x {dim}, {query_count} queries, {threads} threads, FAISS "
        f"{faiss.__version__}; load {load_start:.2f} -> {os.getloadavg()[0]:.2f}\n"
    )
    click.echo("| factory | index MiB | rescore r | recall@10 | QPS @64 |\n|---|---|---|---|---|")
    for row in rows:
        click.echo(
            f"| `{row['factory']}` | {row['index_bytes'] / 2**20:.1f} | {row['rescore']} "
            f"| {row['recall_at_10']:.3f} | {row['qps_batch64']:,} |"
        )
    if json_out:
        json_out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
