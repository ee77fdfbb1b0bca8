"""The service with a real Redis: shared cache and rate limit, jobs, hot swap of index versions
under load, and a Redis that dies mid-test."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import redis
from rq import Queue, SimpleWorker

from indexer.jobs import DEFAULT_QUEUE, work_in_process
from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.service_helpers import (
    ADMIN_KEY,
    KEYS,
    SEARCH_KEY,
    WRITE_KEY,
    assert_error,
    b64,
    copy_root,
    corpus_images,
    wait_for_job,
    wait_for_version,
)

SEARCH = "/v1/collections/images/search"


def _settings(bundle: Path, root: Path, redis_url: str | None, **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "bundle": bundle,
        "index_root": root,
        "redis_url": redis_url,
        "api_keys": KEYS,
        "rate_limit_per_minute": 0,
        **overrides,
    }
    return Settings.model_validate(fields)


class Load:
    """Searches in background threads until stopped; counts every outcome."""

    def __init__(self, servers: list[LiveServer], threads: int = 4) -> None:
        self.servers = servers
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.versions: set[int] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, number: int) -> None:
        server = self.servers[number % len(self.servers)]
        with httpx.Client(base_url=server.url, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                try:
                    response = client.post(SEARCH, json={"text": f"load {number} {i % 7}", "k": 5})
                    ok = response.status_code == 200 and len(response.json()["hits"]) == 5
                    detail = "" if ok else f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as error:
                    ok, detail = False, repr(error)
                with self._lock:
                    self.outcomes["ok" if ok else "failed"] += 1
                    if ok:
                        self.versions.add(response.json()["version"])
                    else:
                        self.failures.append(detail)

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def wait_for(self, requests: int) -> None:
        deadline = time.monotonic() + 60
        start = self.outcomes["ok"]
        while self.outcomes["ok"] < start + requests and time.monotonic() < deadline:
            time.sleep(0.02)


def test_cache_and_rate_limit_are_shared_through_redis(
    micro_bundle: Path, served_root: tuple[Path, Path], redis_db: str
) -> None:
    root = served_root[1]
    settings = _settings(micro_bundle, root, redis_db, rate_limit_per_minute=4)
    with (
        live_server(settings) as first,
        live_server(settings) as second,
        first.client() as a,
        second.client() as b,
    ):
        key = {"X-API-Key": SEARCH_KEY}
        miss = a.post(SEARCH, json={"text": "A  Red Circle"}, headers=key).json()
        assert miss["cached"] is False
        # Another replica, with an empty local cache, finds it in Redis (same normalised text).
        hit = b.post(SEARCH, json={"text": "a red circle"}, headers=key).json()
        assert hit["cached"] is True
        assert hit["hits"] == miss["hits"]
        assert 'cots_cache_total{backend="redis",result="hit"} 1.0' in b.get("/metrics").text
        with redis.Redis.from_url(redis_db) as client:
            assert len(client.keys("cots:emb:*:text:*")) == 1
        # Two requests so far for this key; the limit of 4 is counted across both replicas.
        assert a.post(SEARCH, json={"text": "x"}, headers=key).status_code == 200
        assert b.post(SEARCH, json={"text": "x"}, headers=key).status_code == 200
        assert_error(a.post(SEARCH, json={"text": "x"}, headers=key), 429, "reader")


def _wait_ready(client: httpx.Client, status: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get("/readyz").json()
        if body["status"] == status:
            return dict(body)
        time.sleep(0.1)
    raise AssertionError(f"/readyz never said {status}")


def test_writes_swap_versions_on_every_replica_under_load(
    micro_bundle: Path, served_root: tuple[Path, Path], redis_db: str, tmp_path: Path
) -> None:
    root = copy_root(served_root[1], tmp_path)
    # A long poll interval: only the Redis announcement can make the other replica swap fast.
    settings = _settings(micro_bundle, root, redis_db, reload_poll_s=120)
    write = {"X-API-Key": WRITE_KEY}
    with (
        live_server(settings) as first,
        live_server(settings) as second,
        first.client() as a,
        second.client() as b,
        Load([first, second]) as load,
    ):
        load.wait_for(20)
        top = a.post(SEARCH, json={"text": "a green star", "k": 1}).json()["hits"][0]["id"]
        job = a.post("/v1/collections/images/items/remove", json={"ids": [top]}, headers=write)
        assert job.status_code == 202, job.text
        finished = wait_for_job(a, job.json()["id"], WRITE_KEY)
        assert finished["status"] == "finished", finished
        assert finished["result"] == {"version": 2, "detail": {"removed": 1}}
        assert wait_for_version(b, "images", 2) < 5
        load.wait_for(20)
        for client in (a, b):
            after = client.post(SEARCH, json={"text": "a green star", "k": 48}).json()
            assert after["version"] == 2
            assert top not in [h["id"] for h in after["hits"]]

        image = corpus_images(served_root[0])[5]
        added = a.post(
            "/v1/collections/images/items",
            json={"items": [{"image": b64(image), "caption": "a brand new picture"}]},
            headers=write,
        )
        assert added.status_code == 202, added.text
        assert wait_for_job(a, added.json()["id"], WRITE_KEY)["status"] == "finished"
        wait_for_version(b, "images", 3)
        load.wait_for(20)
        found = b.post(SEARCH, json={"image": b64(image), "k": 2}).json()["hits"]
        assert {h["caption"] for h in found} >= {"a brand new picture"}
        assert all(h["score"] > 0.999 for h in found)  # the original and its new copy
    assert load.outcomes["failed"] == 0, load.failures[:3]
    assert load.versions == {1, 2, 3}


def test_a_replica_loads_only_the_segment_an_add_wrote(
    micro_bundle: Path, served_root: tuple[Path, Path], redis_db: str, tmp_path: Path
) -> None:
    root = copy_root(served_root[1], tmp_path)
    settings = _settings(micro_bundle, root, redis_db, reload_poll_s=120)
    write = {"X-API-Key": WRITE_KEY}
    with (
        live_server(settings) as first,
        live_server(settings) as second,
        first.client() as a,
        second.client() as b,
    ):
        before = b.get("/v1/collections/images").json()
        assert [s["count"] for s in before["segments"]] == [48]
        held = second.state.registry.get("images")
        image = corpus_images(served_root[0])[2]
        added = a.post(
            "/v1/collections/images/items",
            json={"items": [{"image": b64(image), "caption": "one more"}]},
            headers=write,
        )
        assert wait_for_job(a, added.json()["id"], WRITE_KEY)["status"] == "finished"
        wait_for_version(b, "images", 2)
        after = b.get("/v1/collections/images").json()
        old, new = after["segments"]
        assert old == before["segments"][0]
        assert new["count"] == 1
        assert after["count"] == after["live"] == 49
        assert after["size_bytes"] > before["size_bytes"]
        swapped = second.state.registry.get("images")
        # The replica loaded the new segment alone and shares the old one with version 1.
        assert swapped.loaded == [new["id"]]
        assert swapped.segments.segments[0] is held.segments.segments[0]
        removed = a.post("/v1/collections/images/items/remove", json={"ids": [0]}, headers=write)
        assert wait_for_job(a, removed.json()["id"], WRITE_KEY)["status"] == "finished"
        wait_for_version(b, "images", 3)
        third = b.get("/v1/collections/images").json()
        assert third["tombstones"] == 1
        assert [s["tombstones"] for s in third["segments"]] == [1, 0]
        assert second.state.registry.get("images").loaded == []  # a remove loads nothing


def test_reindex_runs_on_the_queue_and_replicas_load_the_result(
    micro_bundle: Path, served_root: tuple[Path, Path], redis_db: str, tmp_path: Path
) -> None:
    root = copy_root(served_root[1], tmp_path)
    settings = _settings(micro_bundle, root, redis_db, reload_poll_s=120)
    with live_server(settings) as server, server.client() as client, Load([server]) as load:
        admin = {"X-API-Key": ADMIN_KEY}
        started = client.post(
            "/v1/collections/captions/reindex", json={"factory": "Flat"}, headers=admin
        )
        assert started.status_code == 202, started.text
        job = started.json()
        assert job["status"] == "queued"
        assert not job["id"].startswith("local-")
        connection = redis.Redis.from_url(redis_db)
        worker = SimpleWorker([Queue(DEFAULT_QUEUE, connection=connection)], connection=connection)
        assert work_in_process(worker, burst=True)
        done = wait_for_job(client, job["id"], ADMIN_KEY)
        assert done["status"] == "finished", done
        assert done["result"]["version"] == 2
        wait_for_version(client, "captions", 2)
        info = client.get("/v1/collections/captions").json()
        assert info["index_type"] == "Flat"
        assert info["versions"] == [1, 2]
    assert load.outcomes["failed"] == 0, load.failures[:3]


def test_compaction_runs_on_the_queue_and_replicas_load_the_result(
    micro_bundle: Path, served_root: tuple[Path, Path], redis_db: str, tmp_path: Path
) -> None:
    root = copy_root(served_root[1], tmp_path)
    settings = _settings(micro_bundle, root, redis_db, reload_poll_s=120)
    admin, write = {"X-API-Key": ADMIN_KEY}, {"X-API-Key": WRITE_KEY}
    with live_server(settings) as server, server.client() as client, Load([server]) as load:
        removed = client.post(
            "/v1/collections/images/items/remove", json={"ids": list(range(20))}, headers=write
        )
        assert wait_for_job(client, removed.json()["id"], WRITE_KEY)["status"] == "finished"
        wait_for_version(client, "images", 2)
        assert client.get("/v1/collections/images").json()["tombstones"] == 20
        refused = client.post("/v1/collections/images/compact", json={"full": 1.5}, headers=admin)
        assert_error(refused, 422, "full")
        started = client.post("/v1/collections/images/compact", json={}, headers=admin)
        assert started.status_code == 202, started.text
        assert started.json()["kind"] == "compact"
        connection = redis.Redis.from_url(redis_db)
        worker = SimpleWorker([Queue(DEFAULT_QUEUE, connection=connection)], connection=connection)
        assert work_in_process(worker, burst=True)
        done = wait_for_job(client, started.json()["id"], ADMIN_KEY)
        assert done["status"] == "finished", done
        assert done["result"]["version"] == 3
        assert done["result"]["compacted"] is True
        wait_for_version(client, "images", 3)  # announced on the channel: no poll needed
        info = client.get("/v1/collections/images").json()
        assert info["tombstones"] == 0
        assert info["count"] == info["live"] == 28
        assert [s["count"] for s in info["segments"]] == [28]
        # Nothing left to merge: the job says so and publishes nothing.
        again = client.post("/v1/collections/images/compact", json={}, headers=admin)
        assert work_in_process(worker, burst=True)
        result = wait_for_job(client, again.json()["id"], ADMIN_KEY)["result"]
        assert result["compacted"] is False
        assert result["version"] == 3
    assert load.outcomes["failed"] == 0, load.failures[:3]


def test_without_redis_jobs_run_in_process(
    micro_bundle: Path, served_root: tuple[Path, Path], tmp_path: Path
) -> None:
    root = copy_root(served_root[1], tmp_path)
    with live_server(_settings(micro_bundle, root, None)) as server, server.client() as client:
        started = client.post(
            "/v1/collections/videos/reindex", json={}, headers={"X-API-Key": ADMIN_KEY}
        )
        assert started.status_code == 202
        assert started.json()["id"].startswith("local-")
        done = wait_for_job(client, started.json()["id"], ADMIN_KEY)
        assert done["status"] == "finished", done
        assert client.get("/readyz").json()["collections"]["videos"] == 2


def test_search_survives_redis_dying(
    micro_bundle: Path,
    served_root: tuple[Path, Path],
    private_redis: tuple[subprocess.Popen[bytes], str],
) -> None:
    process, url = private_redis
    settings = _settings(micro_bundle, served_root[1], url)
    with live_server(settings) as server, server.client() as client, Load([server]) as load:
        assert _wait_ready(client, "ready")["redis"] == "ok"
        load.wait_for(30)
        process.kill()
        process.wait()
        load.wait_for(50)
        degraded = _wait_ready(client, "degraded")
        assert degraded["redis"] == "down"
        assert client.get("/readyz").status_code == 200  # still serving: degraded, not down
        fresh = client.post(SEARCH, json={"text": "a query never seen before"})
        assert fresh.status_code == 200
        assert fresh.json()["cached"] is False
        load.wait_for(30)
        assert "cots_redis_up 0.0" in client.get("/metrics").text
    assert load.outcomes["failed"] == 0, load.failures[:3]


def test_readyz_names_collections_it_cannot_serve(
    micro_bundle: Path, served_root: tuple[Path, Path], tmp_path: Path
) -> None:
    root = copy_root(served_root[1], tmp_path)
    info_path = root / "videos" / "current" / "index.json"
    info = json.loads(info_path.read_text())
    info["model_bundle_id"] = "0" * 64
    info_path.write_text(json.dumps(info))
    with live_server(_settings(micro_bundle, root, None)) as server, server.client() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200  # degraded, still serving the others
        body = ready.json()
        assert body["status"] == "degraded"
        assert "videos" in body["unavailable"]
        assert "model bundle" in body["unavailable"]["videos"]
        assert "cots_collections_unavailable 1.0" in client.get("/metrics").text
        assert_error(
            client.post("/v1/collections/videos/search", json={"text": "x"}), 503, "model bundle"
        )
        assert client.post(SEARCH, json={"text": "x"}).status_code == 200


def _version_files(root: Path, name: str) -> list[Path]:
    """The files one version of ``name`` reads: its own (index.json, deleted.npy) and its
    segments' files."""
    version = (root / name / "current").resolve()
    files = sorted(p for p in version.iterdir() if p.is_file())
    for segment in json.loads((version / "index.json").read_text())["segments"]:
        files += sorted(p for p in (root / name / "segments" / segment).iterdir() if p.is_file())
    return files


# Every file of a version; those index.json does not describe are checked against the SHA-256s
# it carries (vectors.npy is read only by compaction: without them its damage went unseen).
DAMAGEABLE = (
    "index.json",
    "deleted.npy",
    "segment.json",
    "index.faiss",
    "metadata.sqlite",
    "ids.npy",
    "vectors.npy",
)


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.unlink()  # (the copy shares nothing with the fixture's root, but be safe)
    if how == "garbage":
        path.write_bytes(b"\x00garbage" * 64)
    else:  # one flipped byte near the end: same size, the header intact
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])


@pytest.mark.parametrize(
    ("damaged", "how"),
    [(name, "garbage") for name in DAMAGEABLE] + [("ids.npy", "flip"), ("vectors.npy", "flip")],
)
def test_a_damaged_file_takes_only_its_collection_out(
    micro_bundle: Path, served_root: tuple[Path, Path], tmp_path: Path, damaged: str, how: str
) -> None:
    root = copy_root(served_root[1], tmp_path)
    targets = [p for p in _version_files(root, "videos") if p.name == damaged]
    assert targets, f"no {damaged} in the version"
    for target in targets:
        _damage(target, how)
    with live_server(_settings(micro_bundle, root, None)) as server, server.client() as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        body = ready.json()
        assert body["status"] == "degraded"
        assert set(body["unavailable"]) == {"videos"}
        assert set(body["collections"]) == {"images", "captions"}
        assert client.post(SEARCH, json={"text": "a red circle"}).status_code == 200
        error = assert_error(
            client.post("/v1/collections/videos/search", json={"text": "x"}), 503, "videos"
        )
        assert body["unavailable"]["videos"] in error["message"]
        assert "cots_collections_unavailable 1.0" in client.get("/metrics").text
