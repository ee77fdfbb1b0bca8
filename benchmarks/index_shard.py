"""Splitting a collection into shards, and searching the shards against the whole.

``python -m benchmarks.index_shard --count 200000 --dim 128 --shards 4 [--ray]``: writes one
unsharded collection of ``Mixture`` vectors (``choose_factory`` for all of them, as a build
picks), splits it into S shards (``indexer.sharded_build.split_collection``: in this process,
and with ``--ray`` also as Ray tasks on a local cluster of S CPUs, from a copy), then runs the
same queries through the whole (``Collection``) and the shards (``LocalShards``, one process:
what the router's merge costs, without Ray Serve's hops). Reports the seconds of each step,
the milliseconds a batch of 64 queries takes, the share of result rows identical to the
whole's, and recall@10 against exact search.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import click
import numpy as np

from indexer.assemble import write_version
from indexer.collection import Collection
from indexer.faiss_choice import choose_factory
from indexer.faiss_search import exact_search, recall_of
from indexer.index_bundle import IndexInfo
from indexer.metadata import Item
from indexer.sharded import LocalShards
from indexer.sharded_build import split_collection
from indexer.synthetic_vectors import Mixture
from indexer.versions import publish, staging

BATCH: Final = 64
K: Final = 10


def _write_whole(root: Path, vectors: np.ndarray, factory: str) -> None:
    ids = np.arange(len(vectors), dtype=np.int64)
    items = [Item(id=int(i), kind="image", uri=f"u/{i}", group_id=f"g{i}") for i in ids]
    info = IndexInfo(
        collection="whole",
        kind="image",
        modality="image",
        count=0,
        live=0,
        dim=vectors.shape[1],
        factory=factory,
        model_bundle_id="b" * 64,
        recall_at_10=0.0,
        build={},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    with staging(root, "whole") as staged:
        write_version(staged, ids, vectors, items, factory, info)
        publish(root, "whole", staged, keep=1)


def _search_ms(search: Any, queries: np.ndarray) -> tuple[float, np.ndarray]:
    """Median milliseconds a batch, and every batch's ids."""
    times, found = [], []
    for start in range(0, len(queries), BATCH):
        began = time.perf_counter()
        _, ids = search(queries[start : start + BATCH], K)
        times.append((time.perf_counter() - began) * 1000)
        found.append(ids)
    return float(np.median(times)), np.concatenate(found)


@click.command()
@click.option("--count", type=int, default=200_000, show_default=True)
@click.option("--dim", type=int, default=128, show_default=True)
@click.option("--shards", type=int, default=4, show_default=True)
@click.option("--queries", "n_queries", type=int, default=1024, show_default=True)
@click.option("--factory", default="auto", show_default=True, help="The whole's factory.")
@click.option("--ray", "with_ray", is_flag=True, help="Also split as Ray tasks.")
def main(count: int, dim: int, shards: int, n_queries: int, factory: str, with_ray: bool) -> None:
    mixture = Mixture(dim, seed=0)
    vectors = mixture.sample(count, seed=1)
    queries = mixture.sample(n_queries, seed=2)
    factory = choose_factory(count, dim) if factory == "auto" else factory
    report: dict[str, Any] = {"count": count, "dim": dim, "shards": shards, "factory": factory}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        began = time.perf_counter()
        _write_whole(root / "local", vectors, factory)
        report["whole_build_s"] = round(time.perf_counter() - began, 2)
        if with_ray:
            shutil.copytree(root / "local", root / "ray", symlinks=True)
        began = time.perf_counter()
        split_collection(root / "local", "whole", shards, progress=False)
        report["split_local_s"] = round(time.perf_counter() - began, 2)
        if with_ray:
            import ray

            ray.init(address="local", num_cpus=shards, include_dashboard=False)
            try:
                began = time.perf_counter()
                split_collection(root / "ray", "whole", shards, parallel="ray", progress=False)
                report["split_ray_s"] = round(time.perf_counter() - began, 2)
            finally:
                ray.shutdown()
        _, exact = exact_search(vectors, queries, K)
        with (
            Collection.open(root / "local", "whole") as whole,
            LocalShards.open(root / "local", "whole") as split,
        ):
            whole_ms, whole_ids = _search_ms(whole.nearest, queries)
            split_ms, split_ids = _search_ms(split.nearest, queries)
        report |= {
            "whole_batch_ms": round(whole_ms, 2),
            "shards_batch_ms": round(split_ms, 2),
            "rows_identical": float(np.mean(np.all(whole_ids == split_ids, axis=1))),
            "whole_recall_at_10": round(recall_of(whole_ids, exact), 4),
            "shards_recall_at_10": round(recall_of(split_ids, exact), 4),
        }
    click.echo(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
