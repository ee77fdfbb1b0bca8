"""A live server recovering on its own (issue 21, item 7): without Redis it finds a new version
by polling; a broken new version leaves the old one serving and is counted as a failed reload;
when Redis comes back after an outage, /readyz is ready again."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from indexer.index_bundle import DELETED
from indexer.update import remove_from_collection
from indexer.versions import publish, staging, version_dir
from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.service_helpers import copy_root, wait_for_version
from tests.tools import stop_process, tool_path, wait_until

SEARCH = "/v1/collections/images/search"


def _ids(answer: dict[str, Any]) -> list[int]:
    return [hit["id"] for hit in answer["hits"]]


def _metric(client: httpx.Client, name: str) -> float:
    """The value of one sample of /metrics (0 when it is not there yet)."""
    found = re.search(rf"^{re.escape(name)} (\S+)$", client.get("/metrics").text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# c, d. Versions found by polling, without Redis ---------------------------------------------


@pytest.fixture
def polling(
    micro_bundle: Path, served_root: tuple[Path, Path], tmp_path: Path
) -> Iterator[tuple[LiveServer, Path]]:
    """(a server without Redis that re-reads the version pointers every 0.2 s, its root)."""
    root = copy_root(served_root[1], tmp_path)
    settings = Settings(
        bundle=micro_bundle,
        index_root=root,
        redis_url=None,
        rate_limit_per_minute=0,
        reload_poll_s=0.2,
    )
    with live_server(settings) as server:
        yield server, root


def test_without_redis_a_new_version_is_found_by_polling_and_served(
    polling: tuple[LiveServer, Path],
) -> None:
    server, root = polling
    with server.client() as client:
        before = client.post(SEARCH, json={"text": "a green star", "k": 48}).json()
        assert before["version"] == 1
        top = before["hits"][0]["id"]
        # Published outside the server: no job of its own, no Redis, no announcement.
        assert remove_from_collection(root, "images", ids=[top]) == (2, 1)
        wait_for_version(client, "images", 2, timeout=10)
        after = client.post(SEARCH, json={"text": "a green star", "k": 48}).json()
    assert after["version"] == 2
    assert top not in _ids(after)
    assert len(after["hits"]) == len(before["hits"]) - 1


def _republish(root: Path, name: str, source: int, *, damaged: bool) -> int:
    """Publish version ``source`` of ``name`` again under the next number; ``damaged``: with a
    delete set that no longer matches the SHA-256 its index.json records."""
    folder = version_dir(root, name, source)
    with staging(root, name) as staged:
        shutil.copy2(folder / "index.json", staged / "index.json")
        if damaged:
            (staged / DELETED).write_bytes(b"\x00garbage" * 16)
        else:
            shutil.copy2(folder / DELETED, staged / DELETED)
        return publish(root, name, staged, keep=5)


FAILED_RELOADS = 'cots_index_reloads_total{collection="images",outcome="failed"}'
LOADED_RELOADS = 'cots_index_reloads_total{collection="images",outcome="loaded"}'


def test_a_broken_new_version_keeps_the_old_one_serving_and_counts_a_failed_reload(
    polling: tuple[LiveServer, Path],
) -> None:
    server, root = polling
    query = {"text": "a blue heart", "k": 5}
    with server.client() as client:
        before = client.post(SEARCH, json=query).json()
        assert _republish(root, "images", 1, damaged=True) == 2
        wait_until(
            lambda: _metric(client, FAILED_RELOADS) >= 1,
            10,
            "no failed reload counted for the broken version",
            interval_s=0.05,
        )
        # Not tried again on every poll (0.2 s here): each try re-hashes the files and logs.
        time.sleep(1.5)
        assert _metric(client, FAILED_RELOADS) == 1
        during = client.post(SEARCH, json=query)
        assert during.status_code == 200, during.text
        assert during.json()["version"] == 1
        assert during.json()["hits"] == before["hits"]
        ready = client.get("/readyz").json()
        assert ready["status"] == "ready"
        assert ready["collections"]["images"] == 1
        listed = client.get("/v1/collections").json()
        assert "deleted.npy" in listed["unavailable"]["images"]  # why the new one is not served
        assert _metric(client, LOADED_RELOADS) == 0
        # A good version after it is loaded as usual.
        assert _republish(root, "images", 1, damaged=False) == 3
        wait_for_version(client, "images", 3, timeout=10)
        after = client.post(SEARCH, json=query).json()
        assert after["version"] == 3
        assert after["hits"] == before["hits"]
        assert _metric(client, LOADED_RELOADS) == 1
        assert "images" not in client.get("/v1/collections").json()["unavailable"]


# e. Redis going away and coming back --------------------------------------------------------


def _redis_answers(url: str) -> bool:
    try:
        with redis.Redis.from_url(url, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.ConnectionError:
        return False


def _redis_on_port(port: int, folder: Path) -> subprocess.Popen[bytes]:
    """A redis-server (no persistence) on 127.0.0.1:``port`` again, once it answers PING."""
    server = tool_path("COTS_REDIS_SERVER", "redis.sh", "redis-server")
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(folder), "--logfile", str(folder / "restarted.log")],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    wait_until(
        lambda: _redis_answers(url), 10, f"{server} did not answer on {port}", interval_s=0.05
    )
    return process


def _readiness(client: httpx.Client) -> tuple[str, str]:
    body = client.get("/readyz").json()
    return body["status"], body["redis"]


def test_readyz_is_ready_again_when_redis_comes_back(
    micro_bundle: Path,
    served_root: tuple[Path, Path],
    private_redis: tuple[subprocess.Popen[bytes], str],
    tmp_path: Path,
) -> None:
    process, url = private_redis
    port = int(url.removeprefix("redis://127.0.0.1:").split("/")[0])
    settings = Settings(
        bundle=micro_bundle, index_root=served_root[1], redis_url=url, rate_limit_per_minute=0
    )
    with live_server(settings) as server, server.client() as client:
        assert _readiness(client) == ("ready", "ok")
        process.kill()
        process.wait()
        # No request touches Redis from here on: only the server's own watch can notice.
        wait_until(lambda: _readiness(client) == ("degraded", "down"), 15, "Redis never seen down")
        assert _metric(client, "cots_redis_up") == 0
        restarted = _redis_on_port(port, tmp_path)
        try:
            wait_until(
                lambda: _readiness(client) == ("ready", "ok"),
                15,
                "/readyz never ready again",
                lambda: client.get("/readyz").text,
            )
            assert _metric(client, "cots_redis_up") == 1
            # And the server uses it again: a new query's vector is cached there.
            response = client.post(SEARCH, json={"text": "a query after the outage"})
            assert response.status_code == 200, response.text
            with redis.Redis.from_url(url) as fresh:
                assert len(fresh.keys("cots:emb:*:text:*")) == 1
        finally:
            stop_process(restarted, timeout=10)
