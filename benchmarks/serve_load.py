"""The server side of ``cots bench serve``: a ``cots serve`` child process pinned to its
cores, a correctness check of its answers, and the Prometheus scrapes and CPU readings taken
around each measured level (the load itself is wrk's, ``benchmarks/load_wrk.py``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import click

COLLECTION: Final = "bench"
READY_TIMEOUT_S: Final = 300.0
REQUEST_TIMEOUT_S: Final = 60.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of process ``pid`` (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # After the ")" closing the command name, utime and stime are the 12th and 13th fields.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(pid: int, timeout_s: float = 60.0, window_s: float = 0.2) -> float:
    """Seconds until process ``pid`` uses under a tenth of a core over ``window_s``. A closed
    loop's client leaves its last requests in the server when it stops (wrk closes the
    connections; the server still answers what it has queued): the next measured run must
    not pay for them."""
    start = time.monotonic()
    last = cpu_seconds(pid)
    while last is not None and time.monotonic() - start < timeout_s:
        time.sleep(window_s)
        now = cpu_seconds(pid)
        if now is None or now - last < 0.1 * window_s:
            break
        last = now
    return time.monotonic() - start


@contextmanager
def running_server(
    env: dict[str, str], log: Path, cores: Sequence[int] | None = None
) -> Iterator[Server]:
    """``cots serve`` on a free loopback port until the block ends, yielded once ``/readyz``
    answers 200. Its output goes to ``log``; a failed start raises with the log's tail.
    ``cores``: the CPUs the server (every thread it starts) may run on; None: any."""
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "cots.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        # cwd: the work dir, so no .env of the caller's checkout is read by the settings.
        process = subprocess.Popen(
            command,
            env=env,
            cwd=log.parent,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            # Set in the child before exec, so every thread it ever starts inherits it.
            preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(base_url=url, timeout=5, trust_env=False) as client:
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise click.ClickException(f"the server did not get ready; {log} ends:\n{tail}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        yield Server(url, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def scrape(text: str) -> dict[str, float]:
    """The counters a level needs from a ``/metrics`` page: batch size sum, count and
    cumulative buckets per batcher (``batch_sum:encode``, ``batch_count:search``,
    ``batch_le:encode:8``...), seconds per pipeline stage (``stage_sum:encode``...) and cache
    results summed over backends (``cache:hit``, ``cache:miss``, ``cache:error``)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("cots_batch_size_sum", "cots_batch_size_count"):
                what = "batch_sum" if sample.name.endswith("sum") else "batch_count"
                key = f"{what}:{sample.labels['batcher']}"
            elif sample.name == "cots_batch_size_bucket":
                key = f"batch_le:{sample.labels['batcher']}:{sample.labels['le']}"
            elif sample.name == "cots_stage_seconds_sum":
                key = f"stage_sum:{sample.labels['stage']}"
            elif sample.name == "cots_cache_total":
                key = f"cache:{sample.labels['result']}"
            else:
                continue
            values[key] = values.get(key, 0.0) + sample.value
    return values


def check_answers(server: Server, texts: Sequence[str], k: int) -> Counter[str]:
    """Sends each text once and checks the answer (200, a full page of k hits): wrk counts
    statuses but reads no body, so this is what says the measured server answers right."""
    import httpx

    problems: Counter[str] = Counter()
    path = f"/v1/collections/{COLLECTION}/search"
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
        for text in texts:
            response = client.post(path, json={"text": text, "k": k})
            if response.status_code != 200:
                problems[f"HTTP {response.status_code}"] += 1
            elif len(response.json()["hits"]) != k:
                problems["short page"] += 1
    return problems


def read_metrics(server: Server) -> dict[str, float]:
    import httpx

    return scrape(httpx.get(f"{server.url}/metrics", timeout=10, trust_env=False).text)


def metric_ratio(
    after: dict[str, float], before: dict[str, float], top: str, bottom: str
) -> float | None:
    below = after.get(bottom, 0.0) - before.get(bottom, 0.0)
    return None if below <= 0 else (after.get(top, 0.0) - before.get(top, 0.0)) / below
