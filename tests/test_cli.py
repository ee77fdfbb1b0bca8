"""The ``cots`` command as a user runs it: the installed console script, in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import click
import httpx
import pytest

from tests.tools import free_port

COTS = str(Path(sys.executable).with_name("cots"))


def cots(*args: str | Path | int, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [COTS, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"cots {args} failed ({result.returncode}):\n{result.stderr}")
    return result


def test_top_level_help_lists_commands_without_importing_them() -> None:
    code = (
        "import sys\n"
        "from cots.cli import cli\n"
        "try:\n"
        "    cli(['--help'], prog_name='cots')\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'model.data.synth', 'onnxruntime') if m in sys.modules]\n"
        "print('LOADED', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "data" in out.stdout
    assert "demo" in out.stdout
    assert "LOADED []" in out.stdout


def test_synth_help_explains_every_option() -> None:
    from model.data.cli import synth

    text = cots("data", "synth", "--help").stdout
    options = [p for p in synth.params if isinstance(p, click.Option)]
    assert len(options) >= 15
    for option in options:
        assert option.help, f"{option.opts} has no help text"
        assert option.opts[0] in text
    assert "images.csv" in text
    assert "dataset.json" in text


def test_synth_writes_a_corpus_and_refuses_to_clobber_it(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    result = cots("data", "synth", "--out", out, "--n-images", 40, "--n-videos", 4, "--quiet")
    assert "wrote 40 images" in result.stdout
    assert "held-out colour-shape pairs" in result.stdout
    assert (out / "images.csv").is_file()
    assert (out / "dataset.json").is_file()
    again = cots("data", "synth", "--out", out, "--n-images", 40, "--quiet", check=False)
    assert again.returncode == 1
    assert "--overwrite" in again.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--video-size", "63"], "even"),
        (["--n-images", "many"], "'many' is not a valid integer"),
        (["--val-fraction", "0.6", "--test-fraction", "0.5"], "train split"),
        (["--workers", "0"], "at least 1"),
    ],
)
def test_synth_bad_options_fail_with_a_reason(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = cots("data", "synth", "--out", tmp_path / "c", *args, check=False)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "c").exists()


def test_inspect_and_convert_report_skips(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    cots("data", "synth", "--out", out, "--n-images", 30, "--n-videos", 0, "--quiet")
    # Break one image: the run must go on and say what it skipped and why.
    broken = sorted((out / "images").rglob("*.png"))[3]
    broken.write_bytes(b"not a png")
    report = cots("data", "inspect", out / "images.csv").stdout
    assert "29 items" in report
    assert "skipped 1" in report
    assert "corrupt image" in report
    assert broken.name in report

    shards = tmp_path / "wds"
    cots("data", "convert", out / "images.csv", "--to", "webdataset", "--out", shards)
    assert "29 items" in cots("data", "inspect", shards).stdout


def test_demo_synthesises_trains_then_reuses(tmp_path: Path) -> None:
    args = (
        "demo",
        "--workdir",
        tmp_path,
        "--n-images",
        80,
        "--n-videos",
        40,
        "--quiet",
        "--model",
        "cots-micro",
        "--epochs",
        1,
        "--batch-size",
        16,
        "--no-serve",
    )
    run = cots(*args)
    first = run.stdout
    # --quiet: no progress bar of any stage (training, video decoding, indexing) on stderr
    assert "it/s" not in run.stderr
    assert "%|" not in run.stderr
    assert "rendering 80 images" in first
    assert "[2/6] train: cots-micro" in first
    # the summary block, not the evaluation lines training prints as it goes
    summary = first.split("results (Recall@K")[1]
    assert "  test: t2i_R@1" in summary
    assert "  heldout: t2i_R@1" in summary
    assert "[2/6] train video: temporal pooling" in first
    assert "  videos test: t2v_R@1" in first
    assert "time_order_acc" in first
    assert "with the exported bundle's towers" in first
    assert "[3/6] export: ONNX model bundle of cots-micro-video step" in first
    assert "queries written from test scenes" in first
    assert "runtime search (ONNX, no torch):" in first
    for name in ("images", "captions", "videos"):
        assert f"[4/6] index: building {name}" in first
    assert "[5/6] example queries" in first
    assert "captions <- image" in first
    assert (tmp_path / "sample.png").is_file()
    assert (tmp_path / "runs" / "cots-micro" / "checkpoint.pt").is_file()
    assert (tmp_path / "bundle" / "bundle.json").is_file()
    second = cots(*args).stdout
    assert "[1/6] corpus: reusing" in second
    assert "[2/6] train: reusing" in second
    assert "[2/6] train video: reusing" in second
    assert "[3/6] export: reusing" in second
    assert "[4/6] index: reusing videos" in second
    assert "  heldout: t2i_R@1" in second.split("results (Recall@K")[1]
    _serve_demo_and_query(args, tmp_path)


def _serve_demo_and_query(args: tuple[str | Path | int, ...], workdir: Path) -> None:
    """A third run serves: it prints the URL, and the page and API answer there."""
    port = free_port()
    serving = [str(a) for a in args if a != "--no-serve"] + ["--port", str(port)]
    process = subprocess.Popen(
        [COTS, *serving], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "[6/6] serving: open" in line:
                break
        assert f"http://127.0.0.1:{port}/" in lines[-1], "".join(lines)
        deadline = time.monotonic() + 60
        while True:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the demo server never answered"
                time.sleep(0.2)
        assert ready.json()["collections"] == {"captions": 1, "images": 1, "videos": 1}
        assert "<html" in httpx.get(f"http://127.0.0.1:{port}/").text.lower()
        found = httpx.post(
            f"http://127.0.0.1:{port}/v1/collections/videos/search", json={"text": "a circle"}
        )
        assert found.status_code == 200
        assert found.json()["hits"][0]["uri"].startswith(str(workdir))
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_cots_bench_without_a_checkout_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wheel leaves benchmarks/ out: ``cots bench X`` then names the checkout it needs,
    while ``cots bench --help`` still lists every benchmark."""
    from click.testing import CliRunner

    from cots import bench

    listed = CliRunner().invoke(bench.bench, ["--help"])
    assert listed.exit_code == 0
    assert all(name in listed.output for name in bench.BENCHMARKS)
    monkeypatch.setattr(bench, "find_spec", lambda name: None)
    monkeypatch.setattr(bench, "checkout_root", lambda: None)
    result = CliRunner().invoke(bench.bench, ["serve", "--help"])
    assert result.exit_code == 1
    assert "cots bench needs a source checkout" in result.output
    assert bench.NO_CHECKOUT in " ".join(result.output.split())
