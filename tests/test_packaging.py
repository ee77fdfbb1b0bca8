"""The project as a fresh checkout sees it: importable without torch, nothing untracked needed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def assert_prints_ok(code: str) -> None:
    """``code`` run in a fresh interpreter (nothing imported yet) ends by printing ok."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_serving_side_packages_never_import_torch() -> None:
    code = (
        "import sys\n"
        "import model, model.data, model.data.readers, model.data.synth, model.data.writers\n"
        "import indexer, service, cots.cli, training, training.scene_queries\n"
        "import runtime, runtime.encoder, indexer.build, indexer.collection, indexer.update\n"
        "import indexer.cli, indexer.jobs, indexer.worker_cli, indexer.faiss_index\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    assert_prints_ok(code)


def test_serving_side_packages_import_without_ray() -> None:
    """The serving image installs no distributed extra: everything it runs imports without
    Ray or pyarrow (the Ray engine alone needs them, and says so when asked for)."""
    code = (
        "import sys\n"
        "sys.modules.update({'ray': None, 'pyarrow': None})  # as if not installed\n"
        "import indexer.build, indexer.jobs, indexer.update, indexer.compaction\n"
        "import indexer.cli, indexer.worker_cli, service.app, cots.demo_serve\n"
        "from indexer.errors import CollectionError\n"
        "try:\n"
        "    import indexer.ray_engine\n"
        "except CollectionError as error:\n"
        "    assert 'cots-search[distributed]' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('the Ray engine imported without Ray')\n"
        "print('ok')\n"
    )
    assert_prints_ok(code)


def test_a_copy_of_the_shipped_files_runs(tmp_path: Path) -> None:
    """Copy only what git ships (tracked or not ignored) and use it: catches a module that
    works here only because of an ignored or stray file."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    copy = tmp_path / "checkout"
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / name)
    env = {"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"}
    where = subprocess.run(
        [sys.executable, "-c", "import model; print(model.__file__)"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(copy))
    synth = subprocess.run(
        [
            sys.executable,
            "-m",
            "cots.cli",
            "data",
            "synth",
            "--out",
            str(tmp_path / "c"),
            "--n-images",
            "20",
            "--n-videos",
            "2",
            "--quiet",
        ],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    assert synth.returncode == 0, synth.stderr
    collect = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    assert collect.returncode == 0, collect.stdout + collect.stderr
    for script in ("scripts/bootstrap.sh", "scripts/test.sh", "scripts/demo.sh", ".ci/run"):
        assert (copy / script).stat().st_mode & 0o111, f"{script} is not executable"


def test_the_wheel_has_no_benchmarks(tmp_path: Path) -> None:
    """The wheel (what the Docker images install) holds the product only: no ``benchmarks/``
    and no ``bench_`` module; ``wire/`` (the API's models, which the client needs) is in it.
    Built from a copy of the packaging files and packages, so no build/ or egg-info lands in
    the checkout."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    packages = ("cots", "wire", "runtime", "model", "training", "indexer", "service", "benchmarks")
    for package in packages:
        shutil.copytree(
            ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps"),
            *("--no-build-isolation", "--wheel-dir", str(wheels), str(source)),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assert "service/app.py" in names
    assert "wire/schemas.py" in names  # the client extra's models
    assert "indexer/synthetic_vectors.py" in names
    # the model library and the training job beside it, with the recipes cots demo reads
    assert "model/objectives.py" in names
    assert "training/train.py" in names
    assert "training/recipes/demo-image.json" in names
    assert [name for name in names if name.startswith("benchmarks/")] == []
    assert [name for name in names if "/bench_" in name or "load_wrk" in name] == []


def test_the_api_docs_assets_are_installed() -> None:
    """/docs and /redoc load these from the installed package; a missing one is a blank page
    that only a browser would notice."""
    from service.api.docs import ASSET_FILES, assets_directory

    for name in ASSET_FILES:
        path = Path(assets_directory()) / name
        assert path.is_file(), f"{path} is missing"
        assert path.stat().st_size > 1000, f"{path} is suspiciously small"
