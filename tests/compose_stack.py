"""Drive the project's docker-compose.yml with whatever runs containers here: Docker's
``docker compose``, or podman with podman-compose (``COTS_COMPOSE`` names another command, e.g.
the sandbox's ``container-sandbox.sh compose``)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


def find_compose() -> tuple[list[str], str] | None:
    """(compose command, container engine), or None when this machine runs no containers."""
    configured = os.environ.get("COTS_COMPOSE")
    engine = os.environ.get("COTS_CONTAINER_ENGINE")
    if configured:
        return shlex.split(configured), engine or ("podman" if shutil.which("podman") else "docker")
    if _docker_compose_works():
        return ["docker", "compose"], engine or "docker"
    if shutil.which("podman-compose"):
        return ["podman-compose"], engine or "podman"
    return None


def _docker_compose_works() -> bool:
    """A docker CLI alone is not enough: it needs the compose plugin and a reachable engine."""
    if shutil.which("docker") is None:
        return False
    for probe in (["docker", "compose", "version"], ["docker", "info"]):
        try:
            subprocess.run(probe, capture_output=True, timeout=30, check=True)
        except (OSError, subprocess.SubprocessError):
            return False
    return True


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ComposeStack:
    """One compose project of docker-compose.yml, named so that it touches nothing else."""

    command: list[str]
    engine: str
    project: str
    env: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, timeout: float = 600) -> str:
        """Run ``compose -p PROJECT -f docker-compose.yml ARGS``; its output (stdout and
        stderr), or a test failure showing the end of it."""
        full = [*self.command, "-p", self.project, "-f", str(COMPOSE_FILE), *args]
        return self._run(full, timeout, stderr=subprocess.STDOUT)

    def engine_run(self, *args: str, timeout: float = 120) -> str:
        return self._run([self.engine, *args], timeout)

    def engine_succeeds(self, *args: str, timeout: float = 60) -> bool:
        """Whether ``ENGINE ARGS`` exits 0 (a probe: failing is an answer, not an error)."""
        try:
            done = subprocess.run(
                [self.engine, *args], capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def container_logs(self, container: str) -> str:
        """What the container wrote, stdout and stderr together."""
        return self._run([self.engine, "logs", container], 60, stderr=subprocess.STDOUT)

    def _run(self, command: list[str], timeout: float, stderr: int = subprocess.PIPE) -> str:
        try:
            done = subprocess.run(
                command,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as error:
            output = (error.stdout or b"").decode(errors="replace") if error.stdout else ""
            pytest.fail(f"{shlex.join(command)} ran over {timeout:.0f} s:\n{_tail(output)}")
        if done.returncode != 0:
            pytest.fail(
                f"{shlex.join(command)} exited {done.returncode}:\n"
                f"{_tail(done.stdout + (done.stderr or ''))}",
                pytrace=False,
            )
        return done.stdout

    def containers(self, service: str | None = None, *, running: bool = True) -> list[str]:
        """Names of this project's containers (of one service), sorted."""
        args = ["ps", "--format", "{{.Names}}", "--filter", f"label={PROJECT_LABEL}={self.project}"]
        if service is not None:
            args += ["--filter", f"label={SERVICE_LABEL}={service}"]
        if not running:
            args.insert(1, "--all")
        return sorted(filter(None, self.engine_run(*args).split()))

    def leftovers(self) -> dict[str, list[str]]:
        """This project's containers, volumes and networks that still exist."""
        label = f"label={PROJECT_LABEL}={self.project}"
        found = {
            "containers": self.engine_run("ps", "-a", "--format", "{{.Names}}", "--filter", label),
            "volumes": self.engine_run("volume", "ls", "--format", "{{.Name}}", "--filter", label),
            "networks": self.engine_run(
                "network", "ls", "--format", "{{.Name}}", "--filter", label
            ),
        }
        return {kind: names.split() for kind, names in found.items() if names.split()}

    def exec_python(self, container: str, code: str, timeout: float = 60) -> str:
        return self.engine_run("exec", container, "python", "-c", code, timeout=timeout)

    def logs(self) -> str:
        done = subprocess.run(
            [*self.command, "-p", self.project, "-f", str(COMPOSE_FILE), "logs"],
            cwd=ROOT,
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        return _tail(done.stdout + done.stderr, 120)


def wait_until(
    condition: Callable[[], bool], timeout_s: float, what: str, on_timeout: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {timeout_s:.0f} s; the stack's logs end:\n{on_timeout()}")
        time.sleep(1)
