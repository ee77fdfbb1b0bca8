"""Re-indexing jobs on a real Redis, run by real ``cots worker`` processes on real files.

A cots-micro model is trained for two steps and exported once; a 40-image synthetic corpus is
indexed in-process (the reference, and the no-Redis fallback), through the queue, and through
the queue with the worker SIGKILLed mid-build and the job picked up again. Every queued build
must end with the same ids, vectors and metadata as the reference.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from click.testing import CliRunner
from rq import Queue, SimpleWorker
from rq.registry import StartedJobRegistry

from indexer.build_spec import BuildSpec
from indexer.collection import missing_files
from indexer.compaction import compact_collection
from indexer.errors import JobError
from indexer.jobs import (
    DEFAULT_QUEUE,
    CompactionRequest,
    enqueue_build,
    enqueue_compaction,
    job_status,
    run_build_inline,
    work_in_process,
)
from indexer.redis_updates import UPDATES_CHANNEL, listen_for_updates
from indexer.update import remove_from_collection
from indexer.versions import current_dir, current_version, list_versions, version_dir
from indexer.worker_cli import worker
from model.data.synth import SynthConfig, generate_corpus
from runtime.bundle import read_manifest
from tests.versions import version_content, version_files

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 40
WORKER_TIMEOUT_S = 300

# A worker whose build pauses after each finished shard, so the test can kill it between
# shards; the pause wraps the job's progress callback, which runs right after a shard is saved.
SLOW_WORKER = """
import time
import indexer.jobs as jobs
report = jobs._MetaProgress.__call__
def slowly(self, done, total, stage):
    report(self, done, total, stage)
    if stage == "encoding":
        time.sleep(1.0)
jobs._MetaProgress.__call__ = slowly
from cots.cli import main
main()
"""
WORKER = "from cots.cli import main; main()"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, micro_bundle: Path) -> tuple[Path, Path]:
    """(corpus CSV, model bundle): 40 synthetic images and the session's cots-micro bundle."""
    root = tmp_path_factory.mktemp("jobs-assets")
    config = SynthConfig(seed=11, n_images=N_IMAGES, n_videos=0, image_size=32)
    generate_corpus(root / "corpus", config, workers=1)
    return root / "corpus" / "images.csv", micro_bundle


def _spec(assets: tuple[Path, Path], root: Path) -> BuildSpec:
    csv, bundle = assets
    # Small shards and no decoding processes: five shards, so a build can be cut between them.
    return BuildSpec(
        collection="synth",
        root=root,
        bundle=bundle,
        corpus=str(csv),
        factory="Flat",
        shard_size=8,
        workers=0,
        batch_size=8,
    )


def _content(folder: Path) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """(ids, vectors, metadata rows) of a version folder."""
    return version_content(folder)


def _assert_same_content(folder: Path, reference: Path) -> None:
    ids, vectors, items = _content(folder)
    want_ids, want_vectors, want_items = _content(reference)
    np.testing.assert_array_equal(ids, want_ids)
    # The same ONNX model on the same batches: equal up to float noise.
    np.testing.assert_allclose(vectors, want_vectors, rtol=0, atol=1e-5)
    assert items == want_items


@pytest.fixture(scope="module")
def reference(assets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The version folder of an uninterrupted in-process build (no Redis involved)."""
    spec = _spec(assets, tmp_path_factory.mktemp("reference"))
    calls: list[tuple[int, int, str]] = []
    version = run_build_inline(spec, progress=lambda *call: calls.append(call))
    assert version == 1
    assert current_version(spec.root, spec.collection) == 1
    assert (N_IMAGES, N_IMAGES, "encoding") in calls
    return version_dir(spec.root, spec.collection, 1)


def test_inline_build_without_redis(reference: Path) -> None:
    assert missing_files(reference.parents[2], reference.parents[1].name, reference) == []
    ids, vectors, items = _content(reference)
    assert sorted(ids.tolist()) == list(range(N_IMAGES))
    assert vectors.shape[0] == N_IMAGES
    assert len(items) == N_IMAGES


def _run_worker(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", WORKER, "worker", "--burst", "--redis-url", redis_url, *args]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def test_queued_build_runs_and_announces(
    redis_db: str, assets: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    spec = _spec(assets, tmp_path / "collections")
    # Subscribed before the job exists, so the announcement cannot be missed.
    with listen_for_updates(redis_db, idle_timeout=10) as updates:
        job_id = enqueue_build(redis_db, spec)
        queued = job_status(redis_db, job_id)
        assert queued["status"] == "queued"
        assert queued["progress"]["stage"] == "queued"
        _run_worker(redis_db)
        announced = next(updates)

    status = job_status(redis_db, job_id)
    assert status["status"] == "finished", status
    assert status["error"] is None
    progress = status["progress"]
    assert (progress["done"], progress["total"]) == (N_IMAGES, N_IMAGES), progress
    bundle_id = read_manifest(spec.bundle, verify=False).bundle_id
    expected = {"collection": "synth", "version": 1, "bundle_id": bundle_id}
    assert status["result"] == expected
    assert announced == expected
    assert current_version(spec.root, spec.collection) == 1
    _assert_same_content(version_dir(spec.root, spec.collection, 1), reference)


def test_failed_build_reports_its_error(
    redis_db: str, assets: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = _spec(assets, tmp_path / "collections").model_copy(
        update={"corpus": str(tmp_path / "missing.csv")}
    )
    job_id = enqueue_build(redis_db, spec)
    _run_worker(redis_db)  # burst: the first run and both retries
    status = job_status(redis_db, job_id)
    assert status["status"] == "failed"
    assert status["retries_left"] == 0
    assert "missing.csv" in status["error"]
    assert current_version(spec.root, spec.collection) is None


def _kill_work_horse_when(
    command: list[str], ready: Callable[[], bool], what: str, env: dict[str, str] | None = None
) -> str:
    """Run a worker, SIGKILL the processes below it (its work horse) once ``ready()``, and
    return the worker's output after it has run to the end; the worker itself must exit 0."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while not ready():
            assert process.poll() is None, f"the worker exited before {what}"
            assert time.monotonic() < deadline, f"the job never got to {what}"
            time.sleep(0.05)
        for pid in _descendants(process.pid):
            os.kill(pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=WORKER_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    return output


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (RQ's work horse runs in a process group of its own, so
    killing the worker's group would leave it running)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after its ")" do not.
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


class _CurrentWatcher(threading.Thread):
    """Polls a collection's ``current`` pointer; records every version it saw and any moment it
    pointed at an incomplete folder."""

    def __init__(self, root: Path, collection: str) -> None:
        super().__init__(daemon=True)
        self.root, self.collection = root, collection
        self.seen: set[int] = set()
        self.incomplete: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            version = current_version(self.root, self.collection)
            if version is not None:
                self.seen.add(version)
                folder = version_dir(self.root, self.collection, version)
                missing = missing_files(self.root, self.collection, folder)
                # A version past `keep_versions` may be deleted after a newer one went live.
                if missing and current_version(self.root, self.collection) == version:
                    self.incomplete.append(f"{folder.name}: no {', '.join(missing)}")
            time.sleep(0.01)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def _files(folder: Path) -> dict[str, bytes]:
    return version_files(folder)


@pytest.fixture
def watcher(tmp_path: Path) -> Iterator[_CurrentWatcher]:
    watching = _CurrentWatcher(tmp_path / "collections", "synth")
    watching.start()
    yield watching
    watching.stop()


def test_killed_build_resumes_from_finished_shards(
    redis_db: str,
    assets: tuple[Path, Path],
    reference: Path,
    tmp_path: Path,
    watcher: _CurrentWatcher,
) -> None:
    spec = _spec(assets, tmp_path / "collections")
    assert run_build_inline(spec) == 1
    before = _files(version_dir(spec.root, spec.collection, 1))

    job_id = enqueue_build(redis_db, spec)
    log = (tmp_path / "killed-worker.log").open("w")
    command = [sys.executable, "-c", SLOW_WORKER, "worker", "--burst", "--redis-url", redis_db]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        while (job_status(redis_db, job_id)["progress"]["done"] or 0) == 0:
            assert process.poll() is None, (tmp_path / "killed-worker.log").read_text()
            assert time.monotonic() < deadline, "the build never finished a shard"
            time.sleep(0.05)
        # Like a lost machine: the worker and its work horse die at once, nothing cleans up.
        doomed = _descendants(process.pid)
        process.kill()
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()

    killed = job_status(redis_db, job_id)
    assert killed["status"] == "started"  # nobody has noticed yet
    assert 0 < killed["progress"]["done"] < N_IMAGES, killed
    assert current_version(spec.root, spec.collection) == 1
    assert list_versions(spec.root, spec.collection) == [1]
    assert _files(version_dir(spec.root, spec.collection, 1)) == before

    # RQ notices a dead worker when the job's heartbeat entry in the StartedJobRegistry has
    # expired (about 90 s after the kill) and a live worker runs its registry maintenance: the
    # job then counts as abandoned and, having retries left, is queued again. Run that same
    # cleanup with the clock moved past the expiry instead of waiting for it.
    connection = redis.Redis.from_url(redis_db)
    registry = StartedJobRegistry(DEFAULT_QUEUE, connection=connection)
    registry.cleanup(timestamp=time.time() + 3600)
    requeued = job_status(redis_db, job_id)
    assert requeued["status"] == "queued", requeued
    assert requeued["retries_left"] == 1

    with listen_for_updates(redis_db, idle_timeout=10) as updates:
        resumed = _run_worker(redis_db)
        announced = next(updates)
    finished = job_status(redis_db, job_id)
    assert finished["status"] == "finished", finished
    assert "resuming:" in resumed.stderr, resumed.stderr  # the finished shards were reused
    assert announced["version"] == finished["result"]["version"] == 2
    assert current_version(spec.root, spec.collection) == 2
    _assert_same_content(version_dir(spec.root, spec.collection, 2), reference)
    assert _files(version_dir(spec.root, spec.collection, 1)) == before

    watcher.stop()
    assert watcher.seen == {1, 2}
    assert watcher.incomplete == []


def test_killed_work_horse_is_retried_by_its_worker(
    redis_db: str, assets: tuple[Path, Path], reference: Path, tmp_path: Path
) -> None:
    """The OOM-killer case: only the forked process running the job dies; the worker sees it
    at once and, the job having retries left, queues it again and runs it to the end."""
    spec = _spec(assets, tmp_path / "collections")
    job_id = enqueue_build(redis_db, spec)
    command = [sys.executable, "-c", SLOW_WORKER, "worker", "--burst", "--redis-url", redis_db]

    def one_shard_done() -> bool:
        return bool(job_status(redis_db, job_id)["progress"]["done"])

    output = _kill_work_horse_when(command, one_shard_done, "finishing a shard")
    status = job_status(redis_db, job_id)
    assert status["status"] == "finished", (status, output)
    assert status["retries_left"] == 1
    assert "resuming:" in output
    assert current_version(spec.root, spec.collection) == 1
    _assert_same_content(version_dir(spec.root, spec.collection, 1), reference)


# A worker whose compaction stops after writing its merged segment, on the first attempt only
# (the marker file says the first attempt got there), so the test can kill it at that point.
SLOW_COMPACTION_WORKER = """
import os, sys, time
import indexer.compaction as compaction
marker = os.environ["COTS_TEST_MARKER"]
real = compaction.write_segment
def slowly(*args, **kwargs):
    written = real(*args, **kwargs)
    if not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(120)
    return written
compaction.write_segment = slowly
from cots.cli import main
main()
"""


def test_a_work_horse_killed_mid_compaction_leaves_the_old_version_and_is_retried(
    redis_db: str, assets: tuple[Path, Path], tmp_path: Path
) -> None:
    spec = _spec(assets, tmp_path / "collections")
    run_build_inline(spec)
    remove_from_collection(spec.root, spec.collection, ids=list(range(12)))
    straight = tmp_path / "straight"
    shutil.copytree(spec.root, straight, symlinks=True)
    compact_collection(straight, spec.collection)
    before = version_files(version_dir(spec.root, spec.collection, 2))
    request = CompactionRequest(root=spec.root, collection=spec.collection)
    job_id = enqueue_compaction(redis_db, request)
    marker = tmp_path / "first-attempt"
    command = [sys.executable, "-c", SLOW_COMPACTION_WORKER, "worker", "--burst"]
    killed_at: list[tuple[int | None, dict[str, bytes]]] = []

    def segment_written() -> bool:
        if not marker.exists():
            return False
        # What is live at the moment of the kill.
        version = current_version(spec.root, spec.collection)
        killed_at.append((version, version_files(version_dir(spec.root, spec.collection, 2))))
        return True

    output = _kill_work_horse_when(
        [*command, "--redis-url", redis_db],
        segment_written,
        "writing its merged segment",
        env={**os.environ, "COTS_TEST_MARKER": str(marker)},
    )
    # It was killed with its merged segment written and nothing published.
    assert killed_at == [(2, before)]
    status = job_status(redis_db, job_id)
    assert status["status"] == "finished", (status, output)
    assert status["retries_left"] == 1
    assert status["result"]["compacted"] is True
    assert current_version(spec.root, spec.collection) == 3
    _assert_same_content(
        version_dir(spec.root, spec.collection, 3), current_dir(straight, spec.collection)
    )
    assert version_files(version_dir(spec.root, spec.collection, 2)) == before


def test_listener_skips_malformed_messages(redis_db: str) -> None:
    with listen_for_updates(redis_db, idle_timeout=2) as updates:
        client = redis.Redis.from_url(redis_db)
        client.publish(UPDATES_CHANNEL, "not json")
        client.publish(UPDATES_CHANNEL, "[1, 2]")
        client.publish(UPDATES_CHANNEL, json.dumps({"collection": "a", "version": 3}))
        assert list(updates) == [{"collection": "a", "version": 3}]


def test_unknown_job_and_unreachable_redis(redis_db: str, tmp_path: Path) -> None:
    with pytest.raises(JobError, match="no re-indexing job"):
        job_status(redis_db, "no-such-job")
    dead = "redis://:secret@127.0.0.1:1/0"
    with pytest.raises(JobError, match="cannot reach Redis") as raised:
        enqueue_build(dead, _spec((tmp_path / "corpus.csv", tmp_path / "bundle"), tmp_path))
    assert "secret" not in str(raised.value)
    result = CliRunner().invoke(worker, ["--burst", "--redis-url", dead])
    assert result.exit_code == 1
    assert "cannot reach Redis at redis://:***@127.0.0.1:1/0" in result.output


def _mine(number: int, frame: object) -> None:
    raise AssertionError(f"signal {number} reached the test's own handler")


def test_an_in_process_worker_puts_back_the_signal_handlers_it_replaced(redis_db: str) -> None:
    """RQ's worker installs SIGINT/SIGTERM handlers that do not exit; a process that ran one
    must not keep them (forked children inherit them and then ignore Pool.terminate)."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    connection = redis.Redis.from_url(redis_db)
    try:
        for number in saved:
            signal.signal(number, _mine)
        worker = SimpleWorker([Queue("empty", connection=connection)], connection=connection)
        assert not work_in_process(worker, burst=True)  # nothing queued: it returns at once
        assert signal.getsignal(signal.SIGINT) is _mine
        assert signal.getsignal(signal.SIGTERM) is _mine
        # The control: RQ itself leaves its own handlers behind.
        bare = SimpleWorker([Queue("empty", connection=connection)], connection=connection)
        bare.work(burst=True)
        assert signal.getsignal(signal.SIGTERM) is not _mine
    finally:
        connection.close()
        for number, handler in saved.items():
            signal.signal(number, handler)
