"""The report of ``cots bench serve``: one row per case and concurrency, and the markdown
table with its header lines.

A row holds wrk's figures (p50/p99, QPS, errors), the server's CPU seconds per request (from
/proc, around the measured run only) and what ``/metrics`` says happened in between: mean and
distribution of encoder and FAISS batch sizes, the cache hit rate, and the server's own
encode + search + hydrate seconds per request (its stage timers), which is the part of the
end-to-end time that is model and index work rather than HTTP and scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from benchmarks.load_wrk import WrkResult
from benchmarks.serve_load import metric_ratio

CASE_NAMES: Final = {
    "healthz": "GET /healthz (the HTTP floor)",
    "batch-miss": "batching on, cache miss",
    "batch-hit": "batching on, cache hit",
    "nobatch-miss": "batching off, cache miss",
    "nobatch-hit": "batching off, cache hit",
}
STAGES: Final = ("tokenise", "encode", "search", "hydrate")
BATCH_EDGES: Final = ("1.0", "2.0", "4.0", "8.0", "16.0", "32.0", "64.0", "128.0", "256.0")

HEADER: Final = (
    "| case | concurrency | requests | p50 ms | p99 ms | QPS | errors | mean encode batch "
    "| mean search batch | cache hits | server CPU ms/req | model+index ms/req | load |"
)


@dataclass(frozen=True)
class Measured:
    """One level: wrk's warm-up and measured runs, /metrics around the measured one, and the
    server's CPU seconds during it (None where /proc is missing)."""

    warmup: WrkResult
    result: WrkResult
    before: dict[str, float]
    after: dict[str, float]
    server_cpu_s: float | None


def _delta(level: Measured, key: str) -> float:
    return level.after.get(key, 0.0) - level.before.get(key, 0.0)


def batch_distribution(level: Measured, batcher: str) -> dict[str, int] | None:
    """Calls per batch-size bucket ("<=1", "<=2", ... "<=256", ">256") during the level."""
    counts, below = {}, 0.0
    for edge in BATCH_EDGES:
        cumulative = _delta(level, f"batch_le:{batcher}:{edge}")
        counts[f"<={int(float(edge))}"] = int(cumulative - below)
        below = cumulative
    counts[f">{int(float(BATCH_EDGES[-1]))}"] = int(_delta(level, f"batch_count:{batcher}") - below)
    return counts if below or any(counts.values()) else None


def level_row(case: str, concurrency: int, level: Measured) -> dict[str, Any]:
    result = level.result
    hits = _delta(level, "cache:hit")
    looked_up = sum(_delta(level, f"cache:{r}") for r in ("hit", "miss", "error"))
    work_s = sum(_delta(level, f"stage_sum:{stage}") for stage in STAGES)
    return {
        "case": case,
        "batching": case.startswith("batch"),
        "cache": case.split("-")[1] if "-" in case else None,
        "concurrency": concurrency,
        "requests": result.requests,
        "duration_s": round(result.duration_s, 2),
        "p50_ms": round(result.p50_ms, 2),
        "p90_ms": round(result.p90_ms, 2),
        "p99_ms": round(result.p99_ms, 2),
        "qps": round(result.qps, 1),
        "errors": result.errors,
        "warmup_errors": level.warmup.errors,
        "mean_encode_batch": _round(
            metric_ratio(level.after, level.before, "batch_sum:encode", "batch_count:encode")
        ),
        "mean_search_batch": _round(
            metric_ratio(level.after, level.before, "batch_sum:search", "batch_count:search")
        ),
        "encode_batches": batch_distribution(level, "encode"),
        "search_batches": batch_distribution(level, "search"),
        "cache_hit_rate": round(hits / looked_up, 3) if looked_up else None,
        "server_cpu_ms_per_request": per_request(level.server_cpu_s, result.requests),
        "model_index_ms_per_request": per_request(work_s, result.requests) if work_s else None,
    }


def per_request(seconds: float | None, requests: int) -> float | None:
    return None if seconds is None or not requests else round(seconds * 1000 / requests, 3)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _row(rows: list[dict[str, Any]], case: str, concurrency: int) -> dict[str, Any] | None:
    for row in rows:
        if row["case"] == case and row["concurrency"] == concurrency:
            return row
    return None


def targets(rows: list[dict[str, Any]], in_process: dict[str, Any]) -> dict[str, Any]:
    """The issue-18 checks, each None when the rows it needs were not run: the c=1 overhead
    over in-process work, the c=32 speed-up over c=1 (batching on) and over batching off at
    c=32, the c=32 p99/p50, c=32 QPS against the encoder's own batched throughput in process,
    and whether any request failed."""
    one, many = _row(rows, "batch-miss", 1), _row(rows, "batch-miss", 32)
    off = _row(rows, "nobatch-miss", 32)
    found: dict[str, Any] = {
        "c1_overhead_ms": None,
        "c32_over_c1_qps": None,
        "c32_over_nobatch_qps": None,
        "c32_p99_over_p50": None,
        "c32_over_batched_encoder": None,
        "errors": sum(row["errors"] for row in rows),
    }
    if one:
        found["c1_overhead_ms"] = round(one["p50_ms"] - in_process["single_ms_p50"], 2)
    if one and many and one["qps"]:
        found["c32_over_c1_qps"] = round(many["qps"] / one["qps"], 2)
    if many and off and off["qps"]:
        found["c32_over_nobatch_qps"] = round(many["qps"] / off["qps"], 2)
    if many and many["p50_ms"]:
        found["c32_p99_over_p50"] = round(many["p99_ms"] / many["p50_ms"], 2)
    if many and in_process.get("batched_encode_qps"):
        found["c32_over_batched_encoder"] = round(many["qps"] / in_process["batched_encode_qps"], 2)
    return found


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_line(row: dict[str, Any]) -> str:
    hit_rate = row["cache_hit_rate"]
    cells = [
        CASE_NAMES[row["case"]],
        str(row["concurrency"]),
        str(row["requests"]),
        _cell(row["p50_ms"], ".2f"),
        _cell(row["p99_ms"], ".2f"),
        f"{row['qps']:,.0f}",
        str(row["errors"]),
        _cell(row["mean_encode_batch"], ".1f"),
        _cell(row["mean_search_batch"], ".1f"),
        "-" if hit_rate is None else f"{hit_rate:.0%}",
        _cell(row["server_cpu_ms_per_request"], ".2f"),
        _cell(row["model_index_ms_per_request"], ".2f"),
        f"{row['load_1min']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def _distribution(counts: dict[str, int] | None) -> str:
    if not counts:
        return "-"
    return ", ".join(f"{edge}: {n}" for edge, n in counts.items() if n)


def render(result: dict[str, Any]) -> str:
    """The markdown report: what ran, the table, batch sizes, the in-process comparison."""
    machine, batch, load = result["machine"], result["batch_settings"], result["load"]
    lines = [
        f"{result['items']:,} items ({result['factory']}, recall@10 {result['recall_at_10']:.3f}),"
        f" {result['model']} dim {result['dim']}, bundle {result['bundle_id'][:12]}; "
        f"k {result['k']}; cache: {result['cache_backend']}; batching: max_batch "
        f"{batch['max_batch']}, max_wait_ms {batch['max_wait_ms']}",
        f"{machine['cpu_count']} cores ({machine['cpu']}), onnxruntime {machine['onnxruntime']}, "
        f"faiss {machine['faiss']}, uvicorn {machine['uvicorn']} ({machine['uvicorn_loop']}, "
        f"{machine['uvicorn_http']}); load: {load['generator']} pinned to cores "
        f"{load['generator_cores']}, server pinned to cores {load['server_cores']}, "
        f"{load['duration_s']:g} s per level after a {load['warmup_s']:g} s warm-up; providers "
        f"{', '.join(result['providers'])}, ONNX Runtime threads {result['threads'] or 'default'}"
        f", FAISS threads {result['faiss_threads'] or 'default'}; 1-min load "
        f"{result['load_average_start_end'][0]} at start, "
        f"{result['load_average_start_end'][1]} at end",
        "",
        HEADER,
        "|---" * 13 + "|",
        *(table_line(row) for row in result["rows"]),
        "",
        "Batch sizes from /metrics (calls per size bucket) during each batching-on level:",
        "",
        "| case | concurrency | encoder calls | FAISS calls |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row["batching"]:
            lines.append(
                f"| {CASE_NAMES[row['case']]} | {row['concurrency']} | "
                f"{_distribution(row['encode_batches'])} | "
                f"{_distribution(row['search_batches'])} |"
            )
    ip = result["in_process"]
    lines += [
        "",
        f"In process (a child pinned to the server's cores, medians of {ip['queries']} unique "
        f"queries one at a time): tokenise+encode {ip['encode_ms_p50']:.2f} ms, FAISS search "
        f"{ip['search_ms_p50']:.2f} ms, hydrate {ip['hydrate_ms_p50']:.2f} ms, the three "
        f"together {ip['single_ms_p50']:.2f} ms; the encoder alone on batches of "
        f"{ip['batch']}: {ip['batched_encode_qps']:,.0f} texts/s.",
    ]
    if "model_ms_per_text_single" in ip:  # results recorded before 2026-12-04 lack it
        gain = ip["model_ms_per_text_single"] / ip["model_ms_per_text_batched"]
        lines.append(
            f"The text model alone ({ip['tokens_per_text']:.0f} tokens a text): "
            f"{ip['model_ms_per_text_single']:.3f} ms for one text, "
            f"{ip['model_ms_per_text_batched']:.3f} ms per text in batches of {ip['batch']} "
            f"(batching saves it {gain:.2f}x)."
        )
    checks = result["targets"]
    if checks["c1_overhead_ms"] is not None:
        lines.append(
            f"End-to-end p50 at concurrency 1 (batching on, cache miss) minus in process: "
            f"{checks['c1_overhead_ms']:+.2f} ms"
        )
    if checks["c32_over_c1_qps"] is not None:
        lines.append(f"QPS at concurrency 32 / concurrency 1: {checks['c32_over_c1_qps']:.2f}x")
    if checks["c32_over_nobatch_qps"] is not None:
        lines.append(
            f"QPS at concurrency 32, batching on / off: {checks['c32_over_nobatch_qps']:.2f}x"
        )
    if checks["c32_p99_over_p50"] is not None:
        lines.append(f"p99 / p50 at concurrency 32: {checks['c32_p99_over_p50']:.2f}")
    if checks.get("c32_over_batched_encoder") is not None:
        lines.append(
            "QPS at concurrency 32 (batching on) / the encoder's batched texts/s in process: "
            f"{checks['c32_over_batched_encoder']:.2f}x"
        )
    return "\n".join(lines)
