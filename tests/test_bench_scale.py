"""cots bench index scale on a tiny collection: every phase runs end to end and records its
figures (the real runs are 1M and 10M vectors, docs/bench/scale.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks.index_scale import Source, ground_truth, scale_bench
from benchmarks.memory_cap import MemoryCapError, close_cap, open_cap
from indexer.faiss_search import exact_search, recall_of
from runtime.bundle import read_manifest


def test_ground_truth_over_chunks_is_exact_search(tmp_path: Path) -> None:
    source = Source(dim=32, count=5000, seed=3, chunk=1024)
    queries = source.queries(30)
    ids = np.concatenate([ids for ids, _ in source.blocks()])
    vectors = np.concatenate([vectors for _, vectors in source.blocks()])
    _, expected = exact_search(vectors, queries, 10, ids=ids)
    assert recall_of(ground_truth(source, queries, tmp_path), expected) == 1.0
    assert len(list(tmp_path.glob("truth-*.npy"))) == 1  # cached for the next phase


@pytest.mark.slow  # starts four servers and wrk: about a minute on 2 cores
def test_every_phase_runs_on_a_tiny_collection(micro_bundle: Path, tmp_path: Path) -> None:
    dim = read_manifest(micro_bundle).embed_dim
    out = tmp_path / "scale.json"
    common = ["--work", str(tmp_path / "work"), "--count", "4000", "--chunk", "1024"]
    common += ["--dim", str(dim), "--pq-m", "8", "--json-out", str(out), "--queries", "50"]
    runner = CliRunner()

    def run(*args: str) -> None:
        result = runner.invoke(scale_bench, [*args, *common], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    run("--phase", "build", "--bundle", str(micro_bundle))
    run("--phase", "rescore")
    try:
        close_cap(open_cap(2**30, "probe"))
        cap = "2"
    except MemoryCapError:
        cap = "0"  # no means of capping here: serve uncapped
    run("--phase", "serve", "--bundle", str(micro_bundle), "--cap-gb", cap, "--duration", "1")
    run("--phase", "replicas", "--bundle", str(micro_bundle), "--replicas", "2")
    results = json.loads(out.read_text())
    build = results["build"]["pq-4000"]
    assert build["count"] == 4000
    assert build["peak_rss_bytes"] > 0
    assert set(build["files_bytes"]) >= {"index.faiss", "vectors.npy", "metadata.sqlite"}
    rows = results["rescore"]["pq-4000"]["rows"]
    assert [row["rescore"] for row in rows] == [1, 2, 4, 8, 16]
    assert rows[-1]["recall_at_10"] >= rows[0]["recall_at_10"]
    (served,) = results["serve"].values()
    assert served["recall_at_10"] > 0.5
    assert [level["concurrency"] for level in served["levels"]] == [1, 8]
    assert all(level["requests"] > 0 and level["errors"] == 0 for level in served["levels"])
    replicas = results["replicas"]["pq-4000 x2"]
    assert len(replicas["mmap"]["servers"]) == 2
    assert len(replicas["mmap-alone"]["servers"]) == 1
    assert replicas["copy"]["servers"][0]["rss_anon_bytes"] > 0
