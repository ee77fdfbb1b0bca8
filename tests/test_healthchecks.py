"""The containers' healthchecks: the API's (``python -m service.healthcheck``) against a real
server, the worker's (``python -m indexer.worker_health``) against real Redis and a real
``cots worker`` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from indexer import worker_health
from service import healthcheck
from service.settings import Settings
from tests.live_server import live_server
from tests.tools import free_port, wait_until


def test_api_healthcheck_passes_once_ready_and_fails_without_a_server(
    micro_bundle: Path, served_root: tuple[Path, Path]
) -> None:
    settings = Settings.model_validate({"bundle": micro_bundle, "index_root": served_root[1]})
    with live_server(settings) as server:
        healthy, detail = healthcheck.check(f"{server.url}/readyz")
        assert healthy, detail
        assert '"status":"ready"' in detail
        url = f"{server.url}/readyz"
        out = subprocess.run(
            [sys.executable, "-m", "service.healthcheck"],
            env={**os.environ, "COTS_HEALTHCHECK_URL": url},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stdout + out.stderr
    healthy, detail = healthcheck.check(f"http://127.0.0.1:{free_port()}/readyz", timeout_s=2)
    assert not healthy
    assert "refused" in detail.lower()


def test_api_healthcheck_fails_while_no_collection_can_be_served(
    micro_bundle: Path, served_root: tuple[Path, Path]
) -> None:
    settings = Settings.model_validate(
        {"bundle": micro_bundle, "index_root": served_root[1], "collections": ["nosuch"]}
    )
    with live_server(settings) as server:
        healthy, detail = healthcheck.check(f"{server.url}/readyz")
    assert not healthy
    assert detail.startswith("503"), detail


def test_worker_healthcheck_follows_a_real_worker(redis_db: str, tmp_path: Path) -> None:
    healthy, detail = worker_health.check(redis_db)
    assert not healthy
    assert "no worker" in detail
    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [sys.executable, "-m", "cots.cli", "worker", "--redis-url", redis_db],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(
            lambda: worker_health.check(redis_db)[0],
            30,
            "the worker never looked healthy",
            lambda: f"{worker_health.check(redis_db)}\n{(tmp_path / 'worker.log').read_text()}",
        )
        # RQ registers a worker as "started" and then turns it "idle"; on a loaded machine the
        # check can fall between the two.
        wait_until(
            lambda: "idle" in worker_health.check(redis_db)[1],
            30,
            "the worker never reported idle",
            lambda: f"{worker_health.check(redis_db)}\n{(tmp_path / 'worker.log').read_text()}",
        )
        # Another host's worker does not make this one healthy.
        assert not worker_health.check(redis_db, hostname="elsewhere")[0]
    finally:
        worker.send_signal(signal.SIGTERM)  # what `docker stop` sends: RQ's warm shutdown
        assert worker.wait(timeout=30) == 0
    # A worker that stopped deregisters itself.
    assert not worker_health.check(redis_db)[0]
    assert socket.gethostname() in worker_health.check(redis_db)[1]


def test_worker_healthcheck_reports_an_unreachable_redis() -> None:
    healthy, detail = worker_health.check(f"redis://127.0.0.1:{free_port()}/0")
    assert not healthy
    assert "cannot reach Redis" in detail


@pytest.mark.parametrize("value", ["", None])
def test_worker_healthcheck_needs_the_redis_url(value: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "COTS_REDIS_URL"}
    if value is not None:
        env["COTS_REDIS_URL"] = value
    out = subprocess.run(
        [sys.executable, "-m", "indexer.worker_health"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "COTS_REDIS_URL is not set" in out.stdout
