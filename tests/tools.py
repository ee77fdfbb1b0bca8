"""Programs the tests need from the machine (redis-server, Chromium), found or installed by
the repository's own scripts."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool_path(variable: str, script: str, what: str) -> str:
    """``$variable``, else the path ``scripts/<script>`` prints (it finds or installs the
    program). A test that needs the program fails when neither works, rather than skip: a
    skipped integration test reads as a passed one."""
    configured = os.environ.get(variable)
    if configured:
        return configured
    try:
        found = subprocess.run(
            [str(ROOT / "scripts" / script)],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as error:
        stderr = getattr(error, "stderr", "") or ""
        failure = (
            f"no {what} for the tests: scripts/{script} failed ({error})\n"
            f"{stderr}\nInstall {what} and set {variable}=/path/to/it."
        )
    else:
        return found.stdout.strip().splitlines()[-1]
    pytest.fail(failure, pytrace=False)  # outside `except`, so no chained traceback


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (another process may take it before it is bound)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_until(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    details: Callable[[], str] = lambda: "",
    interval_s: float = 0.5,
) -> None:
    """Poll ``condition`` until it holds; after ``timeout_s``, fail the test with ``what`` and
    whatever ``details`` says then (logs, the last state)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout_s:.0f} s\n{details()}", pytrace=False)
        time.sleep(interval_s)


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if ``process`` has not exited within ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
