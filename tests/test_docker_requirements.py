"""What the Dockerfile installs: the requirement lists deploy/docker/requirements.py derives from
pyproject.toml, and the pins of deploy/docker/constraints.txt."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.compose_stack import BUILD_LABEL

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "docker_requirements", ROOT / "deploy" / "docker" / "requirements.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


requirements = _requirements_module().requirements


def _names(lines: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(line).name) for line in lines}


def test_serving_has_the_cpu_runtimes_and_no_torch() -> None:
    names = _names(requirements(PYPROJECT, ["serving"], "cpu"))
    assert {"onnxruntime", "faiss-cpu", "fastapi", "numpy"} <= names
    assert not names & {"torch", "onnxruntime-gpu", "faiss-gpu-cu12", "cots-search"}


def test_gpu_variant_swaps_the_runtimes() -> None:
    names = _names(requirements(PYPROJECT, ["serving"], "gpu"))
    assert {"onnxruntime-gpu", "faiss-gpu-cu12", "fastapi"} <= names
    assert not names & {"onnxruntime", "faiss-cpu"}


def test_training_resolves_its_reference_to_the_serving_extra() -> None:
    names = _names(requirements(PYPROJECT, ["training"], "cpu"))
    assert {"torch", "torchvision", "open-clip-torch", "onnxruntime", "fastapi"} <= names
    assert "cots-search" not in names


def test_an_unknown_extra_is_refused() -> None:
    with pytest.raises(SystemExit, match="no extra 'nosuch'"):
        requirements(PYPROJECT, ["nosuch"], "cpu")


def test_constraints_pin_every_requirement_within_pyproject() -> None:
    """The images install these pins: each must exist and satisfy pyproject.toml, or the build
    fails (or quietly drifts) long after the change that caused it."""
    pins: dict[str, str] = {}
    for line in (ROOT / "deploy" / "docker" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not a pin: {line!r}"
            pins[canonicalize_name(name)] = version
    assert "cots-search" not in pins
    wanted = requirements(PYPROJECT, ["serving", "training"], "cpu")
    wanted += requirements(PYPROJECT, ["serving"], "gpu")
    for line in wanted:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not pinned in deploy/docker/constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy pyproject.toml's {line!r}"
        )


def test_every_image_the_dockerfile_builds_carries_the_build_label() -> None:
    # The container tests prune superseded builds by this label; a stage started from an outside
    # image without it would leave its old builds on disk (about 10 GB a fresh checkout).
    stages: dict[str, str] = {}  # stage -> the image or stage it starts from
    labelled: set[str] = set()
    current = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words[:1] == ["FROM"]:
            current = words[3]
            stages[current] = words[1]
        elif words[:1] == ["LABEL"] and words[1].startswith(f"{BUILD_LABEL}="):
            labelled.add(current)
    from_outside = {stage for stage, base in stages.items() if base not in stages}
    assert from_outside == {"os", "gateway"}
    assert from_outside <= labelled
