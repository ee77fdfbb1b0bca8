"""Drive the project's docker-compose.yml with whatever runs containers here: Docker's
``docker compose``, or podman with podman-compose (``COTS_COMPOSE`` names another command, e.g.
the sandbox's ``container-sandbox.sh compose``)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
# The Dockerfile puts it on every image it builds (see its first stage).
BUILD_LABEL = "io.cots-search.build"


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


def base_images() -> list[str]:
    """The registry images the build and the stack start from: the Dockerfile's
    ``ARG *_IMAGE=`` defaults and the compose file's literal ``image:`` names."""
    arg_defaults = re.findall(r"^ARG \w+_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    literal = re.findall(r"^\s+image:\s*([^$\s]+)\s*$", COMPOSE_FILE.read_text(), re.MULTILINE)
    return sorted({*arg_defaults, *literal})


def qualified(image: str) -> str:
    """Docker Hub's full name of ``image`` (podman resolves no short names without a
    registries.conf search list): ``redis:7`` -> ``docker.io/library/redis:7``."""
    first = image.split("/", 1)[0]
    if "/" in image and ("." in first or ":" in first or first == "localhost"):
        return image
    return f"docker.io/{image}" if "/" in image else f"docker.io/library/{image}"


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
        return self._run(self._compose_command(*args), timeout, merge_stderr=True)

    def engine_run(self, *args: str, timeout: float = 120) -> str:
        """``ENGINE ARGS``'s stdout, or a test failure."""
        return self._run([self.engine, *args], timeout)

    def engine_succeeds(self, *args: str, timeout: float = 60) -> bool:
        """Whether ``ENGINE ARGS`` exits 0 (a probe: failing is an answer, not an error)."""
        done = self._execute([self.engine, *args], timeout)
        return done is not None and done.returncode == 0

    def missing_base_images(self) -> dict[str, str]:
        """{image: why} for each base image neither stored here nor pullable now."""
        missing = {}
        for image in base_images():
            name = qualified(image)
            if self.engine_succeeds("image", "inspect", name):
                continue
            done = self._execute([self.engine, "pull", name], 600, merge_stderr=True)
            if done is None:
                missing[image] = "pull timed out after 600 s"
            elif done.returncode != 0:
                missing[image] = _tail(done.stdout, 3)
        return missing

    def container_logs(self, container: str) -> str:
        """What the container wrote, stdout and stderr together."""
        return self._run([self.engine, "logs", container], 60, merge_stderr=True)

    def logs(self) -> str:
        """The end of every service's logs, for failure messages (never fails itself)."""
        done = self._execute(self._compose_command("logs"), 120, merge_stderr=True)
        if done is None:
            return "(compose logs timed out)"
        return f"the stack's logs end:\n{_tail(done.stdout, 120)}"

    def containers(self, service: str | None = None, *, stopped_too: bool = False) -> list[str]:
        """Names of this project's containers (of one service), sorted."""
        args = ["ps", "--format", "{{.Names}}", "--filter", f"label={PROJECT_LABEL}={self.project}"]
        if service is not None:
            args += ["--filter", f"label={SERVICE_LABEL}={service}"]
        if stopped_too:
            args.append("--all")
        return sorted(self.engine_run(*args).split())

    def prune_superseded_images(self) -> str:
        """Remove the untagged images of earlier builds of the Dockerfile (each fresh checkout's
        build leaves ~10 GB of them behind, enough to fill a CI machine's disk in a few runs);
        images without the Dockerfile's label are never touched."""
        return self._run(
            [self.engine, "image", "prune", "--force", "--filter", f"label={BUILD_LABEL}"],
            300,
            merge_stderr=True,
        )

    def leftovers(self) -> dict[str, list[str]]:
        """This project's containers, volumes and networks that still exist."""
        label = f"label={PROJECT_LABEL}={self.project}"
        found = {
            "containers": self.containers(stopped_too=True),
            "volumes": self.engine_run(
                "volume", "ls", "--format", "{{.Name}}", "--filter", label
            ).split(),
            "networks": self.engine_run(
                "network", "ls", "--format", "{{.Name}}", "--filter", label
            ).split(),
        }
        return {kind: names for kind, names in found.items() if names}

    def exec_python(self, container: str, code: str, timeout: float = 60) -> str:
        return self.engine_run("exec", container, "python", "-c", code, timeout=timeout)

    def _compose_command(self, *args: str) -> list[str]:
        return [*self.command, "-p", self.project, "-f", str(COMPOSE_FILE), *args]

    def _execute(
        self, command: list[str], timeout: float, *, merge_stderr: bool = False
    ) -> subprocess.CompletedProcess[str] | None:
        """The finished command, or None when it ran over ``timeout``."""
        try:
            return subprocess.run(
                command,
                cwd=ROOT,
                env={**os.environ, **self.env},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return None

    def _run(self, command: list[str], timeout: float, *, merge_stderr: bool = False) -> str:
        done = self._execute(command, timeout, merge_stderr=merge_stderr)
        if done is None:
            pytest.fail(
                f"{shlex.join(command)} ran over {timeout:.0f} s; {self.logs()}",
                pytrace=False,
            )
        if done.returncode != 0:
            output = done.stdout + (done.stderr or "")
            pytest.fail(
                f"{shlex.join(command)} exited {done.returncode}:\n{_tail(output)}", pytrace=False
            )
        return done.stdout
