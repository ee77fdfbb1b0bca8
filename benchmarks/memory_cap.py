"""A memory limit on a benchmark's child process, by whichever means this machine allows.

In order of preference: ``systemd-run --scope -p MemoryMax=...`` (a transient scope the
command runs in), else a child of this process's cgroup v2 with ``memory.max``, else a child
of its cgroup v1 memory cgroup with ``memory.limit_in_bytes`` (containers without systemd,
where the v1 hierarchy is writable as root). The bench records :attr:`MemoryCap.method`.

``memory_cap(limit)`` -> ``cap.command(argv)`` (the systemd-run prefix, or argv as it is) and
``cap.enter`` as the child's ``preexec_fn`` (moves it into the cgroup before it execs, so all
it ever allocates is charged there) -> ``cap.peak_bytes()`` / ``cap.stats()`` -> the cgroup is
removed when the block ends (its processes must have exited).

A cgroup's charge counts the page cache its processes read as well as their own memory: at the
limit the kernel drops clean file pages (a memory-mapped index's) before it kills anything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

Method = Literal["systemd-run", "cgroup-v2", "cgroup-v1"]

CGROUP_ROOT: Final = Path("/sys/fs/cgroup")


class MemoryCapError(RuntimeError):
    """No means of capping memory works here (no systemd, no writable cgroup)."""


@dataclass
class MemoryCap:
    method: Method
    limit_bytes: int
    folder: Path | None = None  # the cgroup (v1 or v2); None for systemd-run's own scope
    unit: str | None = None  # systemd-run's scope name
    pids: list[int] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as the capped child runs it."""
        if self.method != "systemd-run":
            return argv
        assert self.unit is not None
        prefix = ["systemd-run", "--scope", "--quiet", f"--unit={self.unit}"]
        return [*prefix, "-p", f"MemoryMax={self.limit_bytes}", "--", *argv]

    def enter(self) -> None:
        """Move the calling process into the cgroup (a child's ``preexec_fn``)."""
        if self.folder is not None:
            (self.folder / "cgroup.procs").write_text(str(os.getpid()))

    def _file(self, v1: str, v2: str) -> Path | None:
        folder = self.folder
        if folder is None and self.pids:  # systemd-run: the scope's cgroup, found by its pid
            folder = _own_cgroup("0::", pid=self.pids[0])
        if folder is None:
            return None
        path = folder / (v1 if self.method == "cgroup-v1" else v2)
        return path if path.is_file() else None

    def peak_bytes(self) -> int | None:
        """The most the cgroup was charged (its processes' memory and the page cache they
        read); None where the kernel does not say."""
        path = self._file("memory.max_usage_in_bytes", "memory.peak")
        return int(path.read_text()) if path is not None else None

    def stats(self) -> dict[str, int]:
        """memory.stat's rss/anon, cache/file and mapped_file (bytes), and how often the limit
        was hit (v1 failcnt; v2 events max/oom)."""
        found: dict[str, int] = {}
        stat = self._file("memory.stat", "memory.stat")
        if stat is not None:
            wanted = {"rss", "cache", "mapped_file", "anon", "file", "file_mapped"}
            for line in stat.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in wanted:
                    found[key] = int(value)
        failcnt = self._file("memory.failcnt", "memory.events")
        if failcnt is not None:
            if self.method == "cgroup-v1":
                found["failcnt"] = int(failcnt.read_text())
            else:
                for line in failcnt.read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key in ("max", "oom", "oom_kill"):
                        found[f"events_{key}"] = int(value)
        return found


def _own_cgroup(prefix: str, *, pid: int | str = "self") -> Path | None:
    """The cgroup folder of ``pid`` in the hierarchy whose /proc/<pid>/cgroup line starts
    with ``prefix`` ("0::" for v2; "N:memory:" for v1's memory controller)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if prefix == "0::" and number == "0" and controllers == "":
            return CGROUP_ROOT / path.lstrip("/")
        if prefix == "memory" and "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/")
    return None


def _systemd_run_works() -> bool:
    if shutil.which("systemd-run") is None:
        return False
    probe = ["systemd-run", "--scope", "--quiet", "-p", "MemoryMax=64M", "--", "true"]
    try:
        return subprocess.run(probe, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _make_cgroup(parent: Path | None, name: str, limit_file: str, limit: int) -> Path | None:
    if parent is None or not parent.is_dir():
        return None
    folder = parent / name
    try:
        folder.mkdir()
    except OSError:
        return None
    try:
        (folder / limit_file).write_text(str(limit))
    except OSError:
        with contextlib.suppress(OSError):
            folder.rmdir()
        return None
    return folder


def open_cap(limit_bytes: int, label: str = "cots-bench") -> MemoryCap:
    """A cap of ``limit_bytes`` by the first means that works (see the module docstring);
    :class:`MemoryCapError` when none does. Close it with :func:`close_cap`."""
    name = f"{label}-{os.getpid()}-{time.monotonic_ns() % 10**9}"
    if _systemd_run_works():
        return MemoryCap("systemd-run", limit_bytes, unit=name)
    v2 = (CGROUP_ROOT / "cgroup.controllers").is_file() and "memory" in (
        CGROUP_ROOT / "cgroup.controllers"
    ).read_text().split()
    if v2 and (folder := _make_cgroup(_own_cgroup("0::"), name, "memory.max", limit_bytes)):
        return MemoryCap("cgroup-v2", limit_bytes, folder=folder)
    if folder := _make_cgroup(_own_cgroup("memory"), name, "memory.limit_in_bytes", limit_bytes):
        return MemoryCap("cgroup-v1", limit_bytes, folder=folder)
    raise MemoryCapError(
        "cannot cap a process's memory here: systemd-run fails and no cgroup (v2 memory.max "
        "or v1 memory.limit_in_bytes) under this process's own is writable (run as root, or "
        "where systemd runs)"
    )


def close_cap(cap: MemoryCap) -> None:
    """Remove the cgroup (after its processes exited; retried briefly while they exit)."""
    if cap.folder is None:
        return
    for _ in range(50):
        try:
            cap.folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


@contextlib.contextmanager
def memory_cap(limit_bytes: int, label: str = "cots-bench") -> Iterator[MemoryCap]:
    cap = open_cap(limit_bytes, label)
    try:
        yield cap
    finally:
        close_cap(cap)
