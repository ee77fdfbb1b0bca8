"""The load side of ``cots bench serve``: a ``cots serve`` child process, a closed-loop
``httpx`` load against it, and the Prometheus scrapes and CPU readings around each level."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import click

COLLECTION: Final = "bench"
READY_TIMEOUT_S: Final = 300.0
REQUEST_TIMEOUT_S: Final = 60.0
KEEPALIVE_EXPIRY_S: Final = 2.0


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


@contextmanager
def running_server(env: dict[str, str], log: Path) -> Iterator[Server]:
    """``cots serve`` on a free loopback port until the block ends, yielded once ``/readyz``
    answers 200. Its output goes to ``log``; a failed start raises with the log's tail."""
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
            command, env=env, cwd=log.parent, stdin=subprocess.DEVNULL, stdout=out, stderr=out
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
    """The counters a level needs from a ``/metrics`` page: batch size sum and count per
    batcher (``batch_sum:encode``, ``batch_count:search``...) and cache results summed over
    backends (``cache:hit``, ``cache:miss``, ``cache:error``)."""
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("cots_batch_size_sum", "cots_batch_size_count"):
                what = "batch_sum" if sample.name.endswith("sum") else "batch_count"
                key = f"{what}:{sample.labels['batcher']}"
            elif sample.name == "cots_cache_total":
                key = f"cache:{sample.labels['result']}"
            else:
                continue
            values[key] = values.get(key, 0.0) + sample.value
    return values


@dataclass
class Drive:
    """What one closed-loop run saw: latencies of the 200s with a full page, other outcomes."""

    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0


async def _drive(
    client: Any, texts: Sequence[str], concurrency: int, k: int, tick: Callable[[], object]
) -> Drive:
    found = Drive()
    pending = iter(texts)  # shared by the workers: next() never yields to the loop
    path = f"/v1/collections/{COLLECTION}/search"

    async def worker() -> None:
        import httpx

        for text in pending:
            start = time.perf_counter()
            try:
                response = await client.post(path, json={"text": text, "k": k})
            except httpx.HTTPError as error:
                found.errors[type(error).__name__] += 1
            else:
                elapsed = time.perf_counter() - start
                if response.status_code != 200:
                    found.errors[f"HTTP {response.status_code}"] += 1
                elif len(response.json()["hits"]) != k:
                    found.errors["short page"] += 1
                else:
                    found.latencies_s.append(elapsed)
            tick()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    found.wall_s = time.perf_counter() - start
    return found


@dataclass
class Level:
    """One concurrency level: warm-up and measured runs, metrics around the measured one, and
    the CPU seconds the server and this client spent on it (None where /proc is missing)."""

    warmed: Drive
    drive: Drive
    before: dict[str, float]
    after: dict[str, float]
    server_cpu_s: float | None
    client_cpu_s: float


async def run_level(
    server: Server,
    warm: Sequence[str],
    measured: Sequence[str],
    concurrency: int,
    k: int,
    tick: Callable[[], object],
) -> Level:
    """Warm up (also opening the connections), then measure between two metrics scrapes."""
    import httpx

    # Idle connections close on our side before uvicorn's 5 s keep-alive timeout closes them
    # on its side: a connection left idle while the warm-up's stragglers finish would otherwise
    # fail the first measured request sent on it (a ReadError that no real client would see
    # more often than its own pool's expiry allows).
    limits = httpx.Limits(
        max_connections=concurrency,
        max_keepalive_connections=concurrency,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )
    async with httpx.AsyncClient(
        base_url=server.url, timeout=REQUEST_TIMEOUT_S, limits=limits, trust_env=False
    ) as client:
        warmed = await _drive(client, warm, concurrency, k, tick)
        before = scrape((await client.get("/metrics")).text)
        server_cpu, client_cpu = cpu_seconds(server.pid), time.process_time()
        drive = await _drive(client, measured, concurrency, k, tick)
        server_after, client_cpu = cpu_seconds(server.pid), time.process_time() - client_cpu
        after = scrape((await client.get("/metrics")).text)
    server_s = None if server_cpu is None or server_after is None else server_after - server_cpu
    return Level(warmed, drive, before, after, server_s, client_cpu)


def metric_ratio(
    after: dict[str, float], before: dict[str, float], top: str, bottom: str
) -> float | None:
    below = after.get(bottom, 0.0) - before.get(bottom, 0.0)
    return None if below <= 0 else (after.get(top, 0.0) - before.get(top, 0.0)) / below
