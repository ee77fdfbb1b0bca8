"""``cots bench serve`` end to end at toy size, and the pieces it trusts to keep cases honest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.serve import (
    CASES,
    QueryTexts,
    ServeBenchConfig,
    ensure_collection,
    server_env,
)
from benchmarks.serve_load import scrape
from cots.cli import cli as main
from runtime.text import clean_lower
from service.metrics import Metrics


def test_query_texts_never_share_a_cache_key() -> None:
    texts = QueryTexts(seed=0, salt=7)
    made = texts.fresh(500) + texts.fresh(500)
    assert len({clean_lower(text) for text in made}) == len(made)
    other_run = QueryTexts(seed=0, salt=8).fresh(500)
    assert not {clean_lower(t) for t in made} & {clean_lower(t) for t in other_run}


def test_scrape_reads_batch_sizes_and_cache_results() -> None:
    from prometheus_client import generate_latest

    metrics = Metrics()
    for size in (1, 3, 4):
        metrics.batch_size.labels("encode").observe(size)
    metrics.batch_size.labels("search").observe(2)
    metrics.cache.labels("local", "hit").inc(2)
    metrics.cache.labels("redis", "hit").inc()
    metrics.cache.labels("redis", "miss").inc(5)
    values = scrape(generate_latest(metrics.registry).decode())
    assert values["batch_sum:encode"] == 8
    assert values["batch_count:encode"] == 3
    assert values["batch_sum:search"] == 2
    assert values["batch_count:search"] == 1
    assert values["cache:hit"] == 3
    assert values["cache:miss"] == 5
    assert values["batch_le:encode:1.0"] == 1  # cumulative buckets: 1 | 3, 4 | -
    assert values["batch_le:encode:4.0"] == 3
    metrics.stages.labels("encode").observe(0.25)
    assert scrape(generate_latest(metrics.registry).decode())["stage_sum:encode"] == 0.25


def test_server_env_drops_the_callers_cots_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("COTS_SEARCH_REQUIRES_KEY", "true")
    monkeypatch.setenv("COTS_RATE_LIMIT_PER_MINUTE", "5")
    config = ServeBenchConfig(bundle=tmp_path, work=tmp_path, providers=("cuda",), gpu_faiss=True)
    env = server_env(config, tmp_path / "indices", batching=False)
    assert "COTS_SEARCH_REQUIRES_KEY" not in env
    assert env["COTS_RATE_LIMIT_PER_MINUTE"] == "0"
    assert env["COTS_BATCH__ENABLED"] == "false"
    assert json.loads(env["COTS_PROVIDERS"]) == ["cuda"]
    assert env["COTS_GPU_FAISS"] == "true"
    assert "COTS_REDIS_URL" not in env


@pytest.mark.slow
def test_serve_bench_runs_every_case_through_the_server(micro_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    args = [
        "bench", "serve", "--bundle", str(micro_bundle), "--work", str(tmp_path / "work"),
        "--items", "2000", "--concurrency", "1,4", "--duration", "1", "--warmup", "1",
        "--hit-texts", "4", "--in-process-queries", "10", "--json", str(out),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "| case | concurrency |" in result.output
    data = json.loads(out.read_text())
    assert data["items"] == 2000
    assert data["factory"] == "Flat"
    assert data["cache_backend"].startswith("in-process")
    assert data["machine"]["cpu_count"] >= 1
    assert data["machine"]["onnxruntime"]
    assert data["in_process"]["queries"] == 10
    assert data["in_process"]["single_ms_p50"] > 0
    assert data["in_process"]["batched_encode_qps"] > 0
    # The model's own cost per text, alone and in full batches, with the token count.
    assert data["in_process"]["model_ms_per_text_single"] > 0
    assert data["in_process"]["model_ms_per_text_batched"] > 0
    assert data["in_process"]["tokens_per_text"] >= 2
    assert data["load"]["generator"].startswith("wrk")
    assert data["targets"]["errors"] == 0
    assert data["targets"]["c1_overhead_ms"] is not None
    rows = data["rows"]
    assert [(r["case"], r["concurrency"]) for r in rows] == [("healthz", 1)] + [
        (case, c) for case in CASES if case != "healthz" for c in (1, 4)
    ]
    assert "| GET /healthz (the HTTP floor) | 1 |" in result.output
    for row in rows[1:]:
        assert row["errors"] == 0, row
        assert row["warmup_errors"] == 0, row
        assert row["requests"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["model_index_ms_per_request"] > 0
        assert row["server_cpu_ms_per_request"] > 0
        assert row["qps"] > 0
        # A miss row that hit the cache (or a hit row that missed) would measure the wrong path.
        assert row["cache_hit_rate"] == (1.0 if row["cache"] == "hit" else 0.0), row
        if row["cache"] == "hit":
            assert row["mean_encode_batch"] is None  # nothing was encoded
        else:
            assert row["mean_encode_batch"] >= 1
        if not row["batching"]:
            assert row["mean_encode_batch"] in (None, 1.0)
            assert row["mean_search_batch"] == 1.0
        else:  # the distribution from /metrics adds up to the calls made
            assert sum(row["search_batches"].values()) >= row["requests"] / 32

    again = ensure_collection(micro_bundle, tmp_path / "work", 2000, seed=0)
    assert again.reused
    assert again.factory == "Flat"
    rebuilt = ensure_collection(micro_bundle, tmp_path / "work", 2000, seed=1)
    assert not rebuilt.reused
