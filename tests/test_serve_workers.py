"""``cots serve --workers 2`` as a user runs it: two uvicorn worker processes behind one port,
each with its share of the cores, both serving, and a write handled by either one reaching
both (through the Redis announcement: the version poll is set far beyond the test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service_helpers import KEYS, WRITE_KEY, copy_root, wait_for_job
from tests.tools import free_port, stop_process

COTS = str(Path(sys.executable).with_name("cots"))
SEARCH = "/v1/collections/images/search"


def _fresh(url: str, path: str) -> httpx.Response:
    # A new connection per request: the kernel hands each accepted connection to one of the
    # workers, so only fresh connections can reach both.
    with httpx.Client(base_url=url, timeout=30) as client:
        return client.get(path)


def _ready_workers(url: str, want: int, timeout: float = 90) -> dict[int, dict]:
    """/readyz of each worker process, polled over fresh connections until ``want`` distinct
    ones have said ready."""
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            body = _fresh(url, "/readyz").json()
        except httpx.TransportError:
            time.sleep(0.2)
            continue
        if body["status"] == "ready":
            seen[body["process"]] = body
            if len(seen) >= want:
                return seen
        time.sleep(0.02)
    raise AssertionError(f"only workers {sorted(seen)} said ready in {timeout} s")


@pytest.fixture
def two_workers(
    micro_bundle: Path, served_root: tuple[Path, Path], redis_db: str, tmp_path: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    root = copy_root(served_root[1], tmp_path)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COTS_")},
        "COTS_RATE_LIMIT_PER_MINUTE": "0",
        "COTS_RELOAD_POLL_S": "3600",
        "COTS_API_KEYS": json.dumps([key.model_dump() for key in KEYS]),
    }
    command = [COTS, "serve", "--bundle", str(micro_bundle), "--index-root", str(root)]
    command += ["--redis-url", redis_db, "--port", str(port), "--workers", "2"]
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        stop_process(process, timeout=30)
        log.close()
        if process.returncode not in (0, -15):
            print((tmp_path / "serve.log").read_text(errors="replace")[-3000:])


def test_two_workers_share_the_cores_serve_and_both_take_a_hot_swap(
    two_workers: tuple[str, subprocess.Popen[bytes]],
) -> None:
    url, parent = two_workers
    workers = _ready_workers(url, 2)
    assert parent.pid not in workers  # the answers come from the worker processes
    cores = len(os.sched_getaffinity(0))
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        share = str(max(1, cores // 2)).encode()
        assert b"COTS_THREADS=" + share in environ, "each worker gets its share of the cores"
        assert b"COTS_FAISS_THREADS=" + share in environ

    answers = set()
    for _ in range(20):
        with httpx.Client(base_url=url, timeout=30) as client:
            response = client.post(SEARCH, json={"text": "a green star", "k": 5})
            assert response.status_code == 200, response.text
            answers.add(tuple(hit["id"] for hit in response.json()["hits"]))
    assert len(answers) == 1  # every worker answers the same query the same way

    with httpx.Client(base_url=url, timeout=30) as client:
        top = next(iter(answers))[0]
        job = client.post(
            "/v1/collections/images/items/remove",
            json={"ids": [top]},
            headers={"X-API-Key": WRITE_KEY},
        )
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        finished = wait_for_job(client, job_id, WRITE_KEY)
    assert finished["status"] == "finished", finished
    assert finished["result"]["version"] == 2
    # The worker that ran the job shares its status through Redis: a poll that reaches the
    # other worker (a fresh connection may) finds it too.
    for _ in range(10):
        with httpx.Client(base_url=url, timeout=30) as client:
            polled = client.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": WRITE_KEY})
            assert polled.status_code == 200, polled.text
            assert polled.json() == finished

    deadline = time.monotonic() + 20
    versions: dict[int, int] = {}
    while time.monotonic() < deadline:
        body = _fresh(url, "/readyz").json()
        versions[body["process"]] = body["collections"]["images"]
        if len(versions) == 2 and set(versions.values()) == {2}:
            break
        time.sleep(0.02)
    assert versions == dict.fromkeys(workers, 2), f"versions per worker: {versions}"
    for _ in range(10):
        with httpx.Client(base_url=url, timeout=30) as client:
            hits = client.post(SEARCH, json={"text": "a green star", "k": 48}).json()["hits"]
            assert top not in [hit["id"] for hit in hits]
