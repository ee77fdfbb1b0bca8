"""Shared fixtures: a real Redis server for the integration tests.

The server comes from ``$COTS_REDIS_SERVER`` (``scripts/test.sh`` sets it) or else from
``scripts/redis.sh``, which finds or installs one. Tests that need Redis fail when none can be
had, rather than skip: a skipped integration test reads as a passed one.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.tools import free_port, stop_process, tool_path

_START_TIMEOUT_S = 10.0


def _redis_server() -> str:
    return tool_path("COTS_REDIS_SERVER", "redis.sh", "redis-server")


def _start(server: str, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``server`` on a free port and wait for PING; (process, url)."""
    log = folder / "redis.log"
    failure = ""
    # Another process can take the free port between probing and binding it: try again.
    for _ in range(3):
        port = free_port()
        command = [
            server,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(folder),
            "--logfile", str(log),
        ]  # fmt: skip
        try:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        except OSError as error:
            failure = f"cannot run redis-server {server!r}: {error}"
            break
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            try:
                with redis.Redis.from_url(url, socket_timeout=1) as client:
                    client.ping()
                return process, url
            except redis.ConnectionError:
                time.sleep(0.05)
        if process.poll() is None:
            process.kill()
            outcome = f"did not answer PING within {_START_TIMEOUT_S:.0f} s"
        else:
            outcome = f"exited with status {process.returncode}"
        process.wait()
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
        failure = f"redis-server {server!r} {outcome} (3 tries); its log ends:\n{tail}"
    pytest.fail(failure, pytrace=False)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``redis://127.0.0.1:PORT/0`` of a private redis-server (no persistence) for the session."""
    process, url = _start(_redis_server(), tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        stop_process(process, timeout=10)


@pytest.fixture
def redis_db(redis_url: str) -> str:
    """The session's Redis URL, with the database emptied first so no test sees another's keys."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    return redis_url


@pytest.fixture(scope="session")
def micro_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model bundle of cots-micro trained two steps on 40 synthetic images (fp32 only):
    real ONNX files for the indexer's tests, made once per session."""
    from model.data.synth import SynthConfig, generate_corpus
    from tests.micro import train_micro
    from training.export import ExportOptions, export_bundle

    root = tmp_path_factory.mktemp("micro-bundle")
    generate_corpus(
        root / "corpus", SynthConfig(seed=11, n_images=40, n_videos=0, image_size=32), workers=1
    )
    checkpoint = train_micro(root / "corpus" / "images.csv", root / "run")
    options = ExportOptions(fp16=False, progress=False, check_items=8)
    return export_bundle(checkpoint, root / "bundle", options)


@pytest.fixture(scope="session")
def synth_images_200(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images.csv of a 200-image synthetic corpus (seed 3, 32 px, no videos), made once per
    session for the training tests that read its captions or train cots-micro on it."""
    from model.data.synth import SynthConfig, generate_corpus

    out = tmp_path_factory.mktemp("synth-200") / "corpus"
    generate_corpus(out, SynthConfig(seed=3, n_images=200, n_videos=0, image_size=32), workers=2)
    return out / "images.csv"


@pytest.fixture(scope="session")
def served_root(micro_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(corpus, index root) holding collections images, captions and videos built with the
    micro bundle; tests that change a collection copy the root first."""
    from tests.live_server import build_served_root

    return build_served_root(tmp_path_factory.mktemp("served"), micro_bundle)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A redis-server of this test's own, which the test may kill: (process, url)."""
    process, url = _start(_redis_server(), tmp_path)
    try:
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


# pyproject.toml's `timeout` (300 s) is for ordinary tests; these marks get more. A container
# test's first call builds the images and starts the stack in its fixture (up to ~45 min with
# cold layers on a slow machine; the fixture's own command timeouts fire first).
_TIMEOUT_BY_MARK_S = {"container": 3600, "slow": 900}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(mark.name == "timeout" for mark in item.iter_markers()):
            continue  # a test's own timeout wins
        for mark, seconds in _TIMEOUT_BY_MARK_S.items():
            if item.get_closest_marker(mark) is not None:
                item.add_marker(pytest.mark.timeout(seconds))
                break
