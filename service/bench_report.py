"""The report of ``cots bench serve``: one row per case and concurrency, and the markdown
table with its header lines."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from service.bench_load import Level, metric_ratio

CASE_NAMES: Final = {
    "batch-miss": "batching on, cache miss",
    "batch-hit": "batching on, cache hit",
    "nobatch-miss": "batching off, cache miss",
    "nobatch-hit": "batching off, cache hit",
}

HEADER: Final = (
    "| case | concurrency | requests | p50 ms | p99 ms | QPS | errors | mean encode batch "
    "| mean search batch | cache hits | server CPU ms/req | client CPU ms/req | load |"
)


def level_row(case: str, concurrency: int, level: Level) -> dict[str, Any]:
    drive, before, after = level.drive, level.before, level.after
    latencies_ms = np.asarray(drive.latencies_s) * 1000
    requests = len(drive.latencies_s) + sum(drive.errors.values())
    hits = after.get("cache:hit", 0.0) - before.get("cache:hit", 0.0)
    looked_up = sum(
        after.get(f"cache:{r}", 0.0) - before.get(f"cache:{r}", 0.0)
        for r in ("hit", "miss", "error")
    )
    return {
        "case": case,
        "batching": case.startswith("batch"),
        "cache": case.split("-")[1],
        "concurrency": concurrency,
        "requests": requests,
        "p50_ms": round(float(np.percentile(latencies_ms, 50)), 2) if len(latencies_ms) else None,
        "p99_ms": round(float(np.percentile(latencies_ms, 99)), 2) if len(latencies_ms) else None,
        "qps": round(requests / drive.wall_s, 1) if drive.wall_s else 0.0,
        "errors": sum(drive.errors.values()),
        "error_kinds": dict(drive.errors),
        "warmup_errors": sum(level.warmed.errors.values()),
        "mean_encode_batch": _round(
            metric_ratio(after, before, "batch_sum:encode", "batch_count:encode")
        ),
        "mean_search_batch": _round(
            metric_ratio(after, before, "batch_sum:search", "batch_count:search")
        ),
        "cache_hit_rate": round(hits / looked_up, 3) if looked_up else None,
        # CPU per request shows which side saturates the shared cores first.
        "server_cpu_ms_per_request": per_request(level.server_cpu_s, requests),
        "client_cpu_ms_per_request": per_request(level.client_cpu_s, requests),
    }


def per_request(seconds: float | None, requests: int) -> float | None:
    return None if seconds is None or not requests else round(seconds * 1000 / requests, 2)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def e2e_ratio(rows: Sequence[dict[str, Any]], in_process: dict[str, Any]) -> float | None:
    """End-to-end p50 at concurrency 1, batching on, cache miss over in-process encode+search."""
    for row in rows:
        if row["case"] == "batch-miss" and row["concurrency"] == 1 and row["p50_ms"]:
            return round(row["p50_ms"] / in_process["encode_search_ms_p50"], 2)
    return None


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table_line(row: dict[str, Any]) -> str:
    errors = str(row["errors"])
    if row["error_kinds"]:
        errors += " (" + ", ".join(f"{k} {v}" for k, v in row["error_kinds"].items()) + ")"
    hit_rate = row["cache_hit_rate"]
    cells = [
        CASE_NAMES[row["case"]],
        str(row["concurrency"]),
        str(row["requests"]),
        _cell(row["p50_ms"], ".1f"),
        _cell(row["p99_ms"], ".1f"),
        f"{row['qps']:,.0f}",
        errors,
        _cell(row["mean_encode_batch"], ".1f"),
        _cell(row["mean_search_batch"], ".1f"),
        "-" if hit_rate is None else f"{hit_rate:.0%}",
        _cell(row["server_cpu_ms_per_request"], ".1f"),
        _cell(row["client_cpu_ms_per_request"], ".1f"),
        f"{row['load_1min']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def render(result: dict[str, Any]) -> str:
    """The markdown report: what ran, the table, the in-process comparison."""
    machine, batch = result["machine"], result["batch_settings"]
    lines = [
        f"{result['items']:,} items ({result['factory']}, recall@10 {result['recall_at_10']:.3f}),"
        f" {result['model']} dim {result['dim']}, bundle {result['bundle_id'][:12]}; "
        f"k {result['k']}; cache: {result['cache_backend']}; batching: max_batch "
        f"{batch['max_batch']}, max_wait_ms {batch['max_wait_ms']}",
        f"{machine['cpu_count']} cores ({machine['cpu']}), onnxruntime {machine['onnxruntime']}, "
        f"faiss {machine['faiss']}, uvicorn {machine['uvicorn']} ({machine['uvicorn_loop']}, "
        f"{machine['uvicorn_http']}), httpx {machine['httpx']} "
        f"(client and server on the same cores); providers {', '.join(result['providers'])}, "
        f"ONNX Runtime threads {result['threads'] or 'default'}, FAISS threads "
        f"{result['faiss_threads'] or 'default'}; "
        f"1-min load {result['load_average_start_end'][0]} at start, "
        f"{result['load_average_start_end'][1]} at end",
        "",
        HEADER,
        "|---" * 13 + "|",
        *(table_line(row) for row in result["rows"]),
        "",
    ]
    ip = result["in_process"]
    lines.append(
        f"In process, medians of {ip['queries']} unique queries: encode_texts([q]) "
        f"{ip['encode_ms_p50']:.2f} ms, Collection.search(k={result['k']}) "
        f"{ip['search_ms_p50']:.2f} ms, the two together {ip['encode_search_ms_p50']:.2f} ms."
    )
    ratio = result["ratio_e2e_p50_to_in_process"]
    if ratio is not None:
        lines.append(
            f"End-to-end p50 at concurrency 1 (batching on, cache miss) / in process: {ratio:.2f}x"
        )
    return "\n".join(lines)
