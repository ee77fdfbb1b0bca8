"""``cots bench index filter``: what a filter costs a search on a large collection.

``N synthetic vectors (as bench index faiss draws them) + a metadata field p, uniform over
0..9999 and independent of the vectors -> one-segment collection (p indexed, as
--index-field p does) -> per filter (p < 5000: 50 %, p < 100: 1 %, p = 4242: 0.01 %): the
first query (the SQL and the selector: what the cache then saves) -> every filter and the
unfiltered search side by side, query by query -> short rows and recall@10 against exact
search over the matching items``

Search is ``Collection.nearest`` (FAISS and the filter; hydration is the same with or without
one), one query at a time, k = 10.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import click
import numpy as np
from tqdm import tqdm

from indexer.assemble import write_version
from indexer.collection import Collection
from indexer.faiss_choice import choose_factory
from indexer.faiss_search import exact_search, recall_of
from indexer.filters import as_filter
from indexer.index_bundle import IndexInfo
from indexer.metadata import Item
from indexer.synthetic_vectors import Mixture
from indexer.versions import publish, staging

NAME: Final = "bench-filter"
BUCKETS: Final = 10_000
FILTERS: Final[dict[str, dict[str, Any]]] = {
    "50%": {"p": {"lt": 5000}},
    "1%": {"p": {"lt": 100}},
    "0.01%": {"p": 4242},
}
RECALL_QUERIES: Final = 50


def _build(root: Path, count: int, dim: int, seed: int) -> tuple[str, np.ndarray, Mixture]:
    mixture = Mixture(dim, seed=seed)
    vectors = mixture.sample(count, seed=seed + 1)
    buckets = np.random.default_rng(seed + 5).integers(BUCKETS, size=count)
    ids = np.arange(count, dtype=np.int64)
    items = [
        Item(id=i, kind="image", uri=f"bench://{i}", group_id=f"g{i}", metadata={"p": int(b)})
        for i, b in zip(ids.tolist(), buckets.tolist(), strict=True)
    ]
    factory = choose_factory(count, dim)
    info = IndexInfo(
        collection=NAME, kind="image", modality="image", count=0, live=0, dim=dim,
        factory=factory, model_bundle_id="bench", recall_at_10=0.0,
        build={"index_fields": ["p"]}, created=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    with staging(root, NAME) as staged:
        write_version(staged, ids, vectors, items, factory, info)
        publish(root, NAME, staged, keep=1)
    return factory, buckets, mixture


def _side_by_side_ms(
    live: Collection, queries: np.ndarray, k: int, filters: dict[str, dict[str, Any] | None]
) -> dict[str, float]:
    """Median ms of one query at a time per filter, the filters taking turns on every query
    (so drift in the machine's load hits all alike)."""
    for query in queries[:20]:
        for chosen in filters.values():
            live.nearest(query[None], k, filters=chosen)
    spent: dict[str, list[float]] = {name: [] for name in filters}
    for query in queries:
        for name, chosen in filters.items():
            start = time.perf_counter()
            live.nearest(query[None], k, filters=chosen)
            spent[name].append(time.perf_counter() - start)
    return {name: round(float(np.median(t) * 1000), 3) for name, t in spent.items()}


def run_filter_bench(
    work: Path, count: int, dim: int, queries: int, k: int, seed: int
) -> dict[str, Any]:
    root = work / "indices"
    shutil.rmtree(root, ignore_errors=True)
    bar = tqdm(total=3 + len(FILTERS), desc="bench index filter", unit="step")
    start = time.perf_counter()
    factory, buckets, mixture = _build(root, count, dim, seed)
    result: dict[str, Any] = {
        "count": count, "dim": dim, "k": k, "factory": factory,
        "build_s": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    bar.update()
    probes = mixture.sample(queries, seed=seed + 3)
    rows: dict[str, dict[str, Any]] = {}
    with Collection.open(root, NAME) as live:
        live.nearest(probes[:1], k)  # page in the index
        for name, chosen in FILTERS.items():
            first = time.perf_counter()
            live.nearest(probes[:1], k, filters=chosen)
            first_ms = round((time.perf_counter() - first) * 1000, 2)
            parsed = as_filter(chosen)
            assert parsed is not None
            matching = live.segments.allowed(parsed)  # cached by the query above
            ids = np.concatenate([a.ids for a in matching if a is not None])
            rows[name] = {"filter": chosen, "matching": len(ids), "first_query_ms": first_ms}
            # Quality: every row full, and recall@10 against exact search over the matches.
            _, found = live.nearest(probes, k, filters=chosen)
            rows[name]["short_rows"] = int(
                np.count_nonzero(np.count_nonzero(found >= 0, axis=1) < min(k, len(ids)))
            )
            allowed = set(ids.tolist())
            rows[name]["foreign_hits"] = int(
                sum(1 for i in found.ravel().tolist() if i >= 0 and i not in allowed)
            )
            sample = probes[:RECALL_QUERIES]
            vectors = np.asarray(live.segments.segments[0].lookup(ids), dtype=np.float32)
            _, truth = exact_search(vectors, sample, k, ids=ids)
            rows[name]["recall_at_10"] = round(recall_of(found[:RECALL_QUERIES], truth), 4)
            del vectors
            bar.update()
        p50 = _side_by_side_ms(live, probes, k, {"none": None, **FILTERS})
        bar.update()
    for name, row in rows.items():
        row["p50_ms"] = p50[name]
        row["over_unfiltered"] = round(p50[name] / p50["none"], 2)
        row["expected_share"] = float(np.mean(_matches(buckets, FILTERS[name])))
    result["unfiltered_p50_ms"] = p50["none"]
    result["filters"] = rows
    result["goals"] = {
        "50%_over_unfiltered": rows["50%"]["over_unfiltered"],
        "0.01%_p50_ms": rows["0.01%"]["p50_ms"],
        "short_rows": sum(r["short_rows"] for r in rows.values()),
    }
    result["machine"] = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_1min": round(os.getloadavg()[0], 2),
    }
    bar.update()
    bar.close()
    return result


def _matches(buckets: np.ndarray, chosen: dict[str, Any]) -> np.ndarray:
    condition = chosen["p"]
    if isinstance(condition, dict):
        return np.asarray(buckets < condition["lt"])
    return np.asarray(buckets == condition)


@click.command("filter", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--count", type=click.IntRange(min=20_000), default=1_000_000, show_default=True,
    help="Vectors (and items) in the collection.",
)  # fmt: skip
@click.option("--dim", type=click.IntRange(min=8), default=256, show_default=True)
@click.option("--queries", type=click.IntRange(min=20), default=300, show_default=True)
@click.option("--k", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--work", type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/bench-filter"), show_default=True,
    help="Scratch folder (its collection is rebuilt each run).",
)  # fmt: skip
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def filter_bench(
    count: int, dim: int, queries: int, k: int, seed: int, work: Path, json_out: Path | None
) -> None:
    """Filtered top-k on a large collection: p50 for filters matching 50 %, 1 % and 0.01 % of
    the items against unfiltered search, the first query's cost, short rows and recall."""
    result = run_filter_bench(work, count, dim, queries, k, seed)
    click.echo(
        f"{count:,} x {dim} vectors ({result['factory']}), k={k}, {queries} queries one at a "
        f"time; unfiltered p50 {result['unfiltered_p50_ms']:.3f} ms"
    )
    click.echo(
        "| filter | matching | first query (SQL + selector) | p50 | / unfiltered | "
        "short rows | recall@10 vs exact over the matches |"
    )
    click.echo("|---|---|---|---|---|---|---|")
    for name, row in result["filters"].items():
        click.echo(
            f"| {name} `{json.dumps(row['filter'])}` | {row['matching']:,} | "
            f"{row['first_query_ms']:.1f} ms | {row['p50_ms']:.3f} ms | "
            f"{row['over_unfiltered']:.2f}x | {row['short_rows']} | {row['recall_at_10']:.3f} |"
        )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n")
