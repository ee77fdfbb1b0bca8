"""``cots bench index faiss``: build time, memory, QPS and recall@10 of the FAISS index types.

Vectors are synthetic but clustered like real embeddings (``Mixture``): a Gaussian mixture in a
low-dimensional latent space, mapped into ``dim`` dimensions with a little isotropic noise, then
L2-normalised. Uniform random vectors would make every approximate index look bad (no structure
to exploit) and a tight mixture would make them all look perfect. Queries are fresh draws from
the same mixture, never database vectors. Recall@10 is against exact search over the database.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import click
import faiss
import numpy as np
from tqdm import tqdm

from indexer.faiss_choice import HNSW_M, ivf_nlist, pq_m_candidates
from indexer.faiss_index import build_index, get_search_params, index_bytes
from indexer.faiss_search import exact_search, recall_of, search
from indexer.synthetic_vectors import Mixture

KINDS: Final = ("flat", "ivf", "ivfpq", "hnsw")
BATCHES: Final = (1, 64)
MIN_SECONDS: Final = 1.0


def factory_for(kind: str, count: int, dim: int) -> str:
    """The factory string benchmarked for ``kind`` (IVF with the automatic nlist and PQ m)."""
    nlist = ivf_nlist(count)
    factories = {
        "flat": "Flat",
        "ivf": f"IVF{nlist},Flat",
        "ivfpq": f"IVF{nlist},PQ{pq_m_candidates(dim)[0]}",
        "hnsw": f"HNSW{HNSW_M}",
    }
    if kind not in factories:
        raise ValueError(f"unknown index kind {kind!r}; known: {', '.join(KINDS)}")
    return factories[kind]


def _rss_bytes() -> int:
    """Resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except OSError:
        return 0


_PAGE: Final = 4096


def _release_memory() -> None:
    """Give freed heap back to the OS, so the next index's RSS growth is its own."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _qps(run: Callable[[np.ndarray], object], queries: np.ndarray, batch: int) -> float:
    """Queries a second of ``run`` over ``queries`` in batches of ``batch``, after one warm-up
    batch, over at least MIN_SECONDS (or every query once, when that takes longer)."""
    batches = [queries[start : start + batch] for start in range(0, len(queries), batch)]
    batches = [b for b in batches if len(b) == batch] or batches
    run(batches[0])
    done, start = 0, time.perf_counter()
    while True:
        for chunk in batches:
            run(chunk)
            done += len(chunk)
            elapsed = time.perf_counter() - start
            if elapsed >= MIN_SECONDS and done >= batch:
                return done / elapsed


def measure(
    kind: str,
    database: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    expected: np.ndarray,
    *,
    threads: int,
    batch1_threads: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Build one index over ``database`` with ``threads`` and measure it (see the module doc)."""
    factory = factory_for(kind, len(database), database.shape[1])
    _release_memory()
    rss_before = _rss_bytes()
    with tqdm(total=len(database), desc=f"{len(database):,} {kind}", unit="vec") as bar:
        bar.set_postfix_str(factory)
        start = time.perf_counter()
        index = build_index(
            database, ids, factory, seed=seed, use_gpu=False, on_progress=bar.update
        )
        build_s = time.perf_counter() - start
    rss_growth = _rss_bytes() - rss_before
    k = expected.shape[1]
    _, found = search(index, queries, k)
    row: dict[str, Any] = {
        "size": len(database),
        "kind": kind,
        "factory": factory,
        "params": get_search_params(index),
        "build_s": round(build_s, 2),
        "index_bytes": index_bytes(index),
        "rss_growth_bytes": rss_growth,
        f"recall_at_{k}": round(recall_of(found, expected), 4),
    }
    for batch in BATCHES:
        faiss.omp_set_num_threads(batch1_threads if batch == 1 else threads)
        row[f"qps_batch{batch}"] = round(_qps(lambda q: search(index, q, k), queries, batch), 1)
    faiss.omp_set_num_threads(threads)
    return row  # the index is freed here; the next measure() trims the heap before it builds


@click.command("faiss", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--sizes",
    default="100000,1000000",
    show_default=True,
    help="Comma-separated database sizes.",
)
@click.option("--dim", type=click.IntRange(min=8), default=256, show_default=True)
@click.option(
    "--kinds",
    default=",".join(KINDS),
    show_default=True,
    help="Comma-separated index kinds among flat, ivf, ivfpq, hnsw.",
)
@click.option(
    "--queries", "query_count", type=click.IntRange(min=64), default=1000, show_default=True
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="FAISS (OpenMP) threads for building, exact search and batch-64 queries.",
)
@click.option(
    "--batch1-threads",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="FAISS threads for batch-1 queries: one query is too little work to split, and a "
    "server answers concurrent queries on separate threads.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results as JSON here.",
)
def faiss_bench(
    sizes: str,
    dim: int,
    kinds: str,
    query_count: int,
    threads: int,
    batch1_threads: int,
    seed: int,
    json_out: Path | None,
) -> None:
    """Build seconds, memory, QPS at batch 1 and 64, and recall@10 of flat, IVF, IVF-PQ and
    HNSW32 on synthetic clustered vectors."""
    try:
        counts = [int(size) for size in sizes.split(",") if size.strip()]
        chosen = [kind.strip() for kind in kinds.split(",") if kind.strip()]
        for kind in chosen:
            factory_for(kind, 1000, dim)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    faiss.omp_set_num_threads(threads)
    load_start = os.getloadavg()[0]  # other work on the machine skews every timing
    mixture = Mixture(dim, seed=seed)
    queries = mixture.sample(query_count, seed=seed + 1)
    rows: list[dict[str, Any]] = []
    for count in counts:
        database = mixture.sample(count, seed=seed + 2)
        # Large, sparse, non-contiguous ids, as a real collection's would be.
        ids = np.arange(count, dtype=np.int64) * 7 + 1_000_000_007
        start = time.perf_counter()
        _, expected = exact_search(database, queries, 10, ids=ids)
        tqdm.write(
            f"exact top-10 of {query_count} queries over {count:,}: "
            f"{time.perf_counter() - start:.1f} s"
        )
        for kind in chosen:
            row = measure(
                kind,
                database,
                ids,
                queries,
                expected,
                threads=threads,
                batch1_threads=batch1_threads,
                seed=seed,
            )
            rows.append(row)
            _print_row(rows[-1], header=len(rows) == 1)
        del database
    loads = (round(load_start, 2), round(os.getloadavg()[0], 2))
    _report(rows, dim, threads, batch1_threads, query_count, loads, json_out)


def _cells(row: dict[str, Any]) -> list[str]:
    params = ", ".join(f"{key} {value}" for key, value in row["params"].items()) or "exact"
    return [
        f"{row['size']:,}",
        f"`{row['factory']}`",
        params,
        f"{row['build_s']:.1f}",
        f"{row['index_bytes'] / 2**20:,.0f}",
        f"{row['rss_growth_bytes'] / 2**20:,.0f}",
        f"{row['qps_batch1']:,.0f}",
        f"{row['qps_batch64']:,.0f}",
        f"{row['recall_at_10']:.3f}",
    ]


HEADER: Final = (
    "| vectors | factory | search params | build s | index MiB | RSS growth MiB "
    "| QPS @1 | QPS @64 | recall@10 |"
)


def _print_row(row: dict[str, Any], *, header: bool) -> None:
    if header:
        tqdm.write(HEADER)
    tqdm.write("| " + " | ".join(_cells(row)) + " |")


def _report(
    rows: list[dict[str, Any]],
    dim: int,
    threads: int,
    batch1_threads: int,
    query_count: int,
    loads: tuple[float, float],
    json_out: Path | None,
) -> None:
    cpu = platform.processor() or platform.machine()
    click.echo(
        f"\nFAISS {faiss.__version__}, dim {dim}, {os.cpu_count()} cores ({cpu}), {threads} "
        f"threads ({batch1_threads} for batch 1); {query_count} queries from the same mixture; "
        f"recall@10 against exact search; 1-min load average {loads[0]} at start, "
        f"{loads[1]} at end\n"
    )
    click.echo(HEADER)
    click.echo("|---" * 9 + "|")
    for row in rows:
        click.echo("| " + " | ".join(_cells(row)) + " |")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "faiss": faiss.__version__,
            "dim": dim,
            "threads": threads,
            "batch1_threads": batch1_threads,
            "cores": os.cpu_count(),
            "queries": query_count,
            "cpu": cpu,
            "load_average_start_end": list(loads),
        }
        json_out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
