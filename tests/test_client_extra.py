"""The ``client`` extra stands alone: a fresh venv with only ``pip install -e ".[client]"`` runs
``cots search`` against a live server, and neither the client nor ``cots search`` loads the
service, the indexer, the model, the runtime or their heavy packages (issue 38 item 2).

The project's base dependencies (what ``cots data`` needs: numpy, Pillow, PyAV, tqdm) come
with any install of it, so the fresh venv has numpy; the client never imports it, which the
import checks below show."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.settings import Settings
from tests.live_server import LiveServer, live_server
from tests.service_helpers import copy_root

ROOT = Path(__file__).resolve().parents[1]
QUERY = "a red circle"
# Ours beside the client, and the packages of the other extras: none may load for the client.
NOT_LOADED = (
    "service",
    "indexer",
    "model",
    "training",
    "runtime",
    "benchmarks",
    "numpy",
    "faiss",
)
NOT_INSTALLED = ("faiss", "onnxruntime", "fastapi", "uvicorn", "redis", "torch", "tokenizers")
# Run in a Python: load the client and `cots search --help`, print the top-level modules loaded.
LOADED = """
import json, sys
from click.testing import CliRunner
import cots.client
from cots.cli import cli
result = CliRunner().invoke(cli, ["search", "--help"])
assert result.exit_code == 0, result.output
assert "--collection" in result.output
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def loaded_by_the_client(python: Path | str, cwd: Path) -> set[str]:
    done = subprocess.run(
        [str(python), "-c", LOADED], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_the_client_and_cots_search_load_nothing_heavy(tmp_path: Path) -> None:
    """In the full environment too: ``cots --help`` and ``cots search --help`` import none of
    the server's packages (the command loads a subcommand's module only when it runs)."""
    loaded = loaded_by_the_client(sys.executable, tmp_path)
    assert "cots" in loaded
    assert "wire" in loaded
    assert sorted(loaded & set(NOT_LOADED)) == []
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from click.testing import CliRunner; from cots.cli import cli; "
            "assert CliRunner().invoke(cli, ['--help']).exit_code == 0; "
            "print(sorted({'numpy', 'faiss', 'torch', 'service', 'indexer'} & set(sys.modules)))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def server(
    micro_bundle: Path, served_root: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    root = copy_root(served_root[1], tmp_path_factory.mktemp("client-extra"))
    settings = Settings(bundle=micro_bundle, index_root=root, rate_limit_per_minute=0)
    with live_server(settings) as running:
        yield running


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding the project installed with the ``client`` extra alone. The
    project is a copy (packaging files and packages), so the install writes no egg-info or
    build folder into the checkout."""
    folder = tmp_path_factory.mktemp("client-extra-venv")
    source = folder / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for package in ("cots", "wire", "runtime", "model", "training", "indexer", "service"):
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    environment = folder / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(environment)
    install = subprocess.run(
        [
            *(str(environment / "bin" / "python"), "-m", "pip", "install", "--quiet"),
            *("-e", f"{source}[client]"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return environment


@pytest.mark.slow
def test_cots_search_runs_with_only_the_client_extra(
    client_venv: Path, server: LiveServer, tmp_path: Path
) -> None:
    python = client_venv / "bin" / "python"
    # The server's packages are not there: the install brought the client extra's alone.
    for module in NOT_INSTALLED:
        missing = subprocess.run(
            [str(python), "-c", f"import {module}"], cwd=tmp_path, capture_output=True, text=True
        )
        assert missing.returncode != 0, f"{module} is installed with the client extra"
        assert "ModuleNotFoundError" in missing.stderr
    # service/ and indexer/ are in the source tree, but cannot run: fastapi, faiss are absent.
    for module in ("service.app", "indexer.faiss_index"):
        refused = subprocess.run(
            [str(python), "-c", f"import {module}"], cwd=tmp_path, capture_output=True, text=True
        )
        assert refused.returncode != 0, f"{module} imports with the client extra"
    # The client and `cots search --help` load none of them, nor numpy.
    assert sorted(loaded_by_the_client(python, tmp_path) & set(NOT_LOADED)) == []

    env = {key: value for key, value in os.environ.items() if not key.startswith("COTS_")}
    search = subprocess.run(
        [
            *(str(client_venv / "bin" / "cots"), "search", QUERY),
            *("--collection", "images", "--url", server.url, "--json", "-k", "5"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert search.returncode == 0, search.stdout + search.stderr
    page = json.loads(search.stdout)
    assert page["collection"] == "images"
    assert page["query"] == "text"
    assert len(page["hits"]) == 5
    expected = server.search("images", text=QUERY, k=5)
    assert [hit["id"] for hit in page["hits"]] == [hit["id"] for hit in expected["hits"]]
    # and a filter, parsed on the client by the wire package's --where
    where = subprocess.run(
        [
            *(str(client_venv / "bin" / "cots"), "search", QUERY),
            *("-c", "images", "--url", server.url, "--json", "--where", "kind=image"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.returncode == 0, where.stdout + where.stderr
    assert json.loads(where.stdout)["hits"]
