"""``cots bench quality`` and ``cots bench train`` end to end, at toy sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks.quality import ROWS
from cots.cli import cli as main
from model.data.synth import SynthConfig, generate_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-corpus") / "corpus"
    generate_corpus(
        out, SynthConfig(seed=4, n_images=120, n_videos=40, image_size=32, video_size=32), workers=2
    )
    return out


def row_number(name: str) -> int:
    return next(i for i, row in enumerate(ROWS, start=1) if row.name == name)


def test_quality_bench_writes_the_table_and_reuses_finished_runs(
    corpus: Path, tmp_path: Path
) -> None:
    cookie = "full COTS + COOKIE (shared head + intra-modal)"
    rows = ["CLIP baseline", "full COTS + masked VL modeling", cookie]
    rows.append("video: temporal transformer")
    out = tmp_path / "quality.md"
    args = [
        "bench", "quality", "--corpus", str(corpus), "--work", str(tmp_path / "work"),
        "--model", "cots-micro", "--steps", "3", "--batch-size", "16",
        "--video-batch-size", "8", "--video-steps", "3", "--seeds", "0,1", "--threads", "1",
        "--out", str(out),
        "--rows", ",".join(str(row_number(r)) for r in rows),
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for name in rows:
        assert f"| {name} |" in text
    assert "t2v R@1" in text
    assert "| row | t2v R@1 | time order | direction | seeds |" in text
    assert "| video: temporal transformer |" in text.split("## Video time checks")[1]
    assert "i2i R@1" in text
    assert "reconstruction_mse" in text
    assert "scene match@1" in text
    assert (
        "scene_match@1"
        in json.loads(out.with_suffix(".json").read_text())["CLIP baseline"][0]["evals"]["test"]
    )
    records = json.loads(out.with_suffix(".json").read_text())
    assert [r["seed"] for r in records["CLIP baseline"]] == [0, 1]  # a main row: every seed
    assert [r["seed"] for r in records[cookie]] == [0]
    assert "t2v_R@1" in records["video: temporal transformer"][0]["evals"]["test"]
    assert (tmp_path / "work" / "visual-tokenizer.pt").is_file()

    again = CliRunner().invoke(main, args)  # everything is reused: no training output
    assert again.exit_code == 0, again.output
    assert "==" not in again.output.split("# Ablation")[0]

    # --no-train tabulates what is finished: seed 2 has not run, and is not trained now
    more_seeds = [a if a != "0,1" else "0,1,2" for a in args] + ["--no-train"]
    partial = CliRunner().invoke(main, more_seeds)
    assert partial.exit_code == 0, partial.output
    assert "==" not in partial.output.split("# Ablation")[0]
    records = json.loads(out.with_suffix(".json").read_text())
    assert [r["seed"] for r in records["CLIP baseline"]] == [0, 1]
    assert not (tmp_path / "work" / "clip-baseline-seed2").exists()


def test_quality_bench_rejects_bad_rows_and_seeds(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "quality", "--rows", "99"])
    assert result.exit_code != 0
    assert "rows are 1.." in result.output
    result = CliRunner().invoke(main, ["bench", "quality", "--seeds", "a"])
    assert result.exit_code != 0
    assert "not a list of integers" in result.output


def test_train_bench_measures_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    args = [
        "bench", "train", "--model", "cots-micro", "--batch-size", "8", "--steps", "1",
        "--warmup", "0", "--threads", "1", "--json-out", str(out),
        "--objectives", "clip,cots+mvlm,clip+cookie,video-clip,cots+hn+conv+words",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    names = ["clip", "cots+mvlm", "clip+cookie", "video-clip", "cots+hn+conv+words"]
    assert [r["objective"] for r in rows] == names
    assert rows[3]["batch_size"] == 2
    assert rows[3]["images_per_step"] == 8
    assert all(r["samples_per_s"] > 0 for r in rows)
    bad = CliRunner().invoke(main, ["bench", "train", "--objectives", "nope"])
    assert bad.exit_code != 0
    assert "unknown variant" in bad.output


def test_train_bench_measures_diagnostics_every_step_against_logged_steps_only(
    tmp_path: Path,
) -> None:
    out = tmp_path / "train.json"
    args = [
        "bench", "train", "--model", "cots-micro", "--batch-size", "8", "--steps", "2",
        "--warmup", "0", "--threads", "1", "--json-out", str(out),
        "--objectives", "cots", "--log-every", "1,10",
    ]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(r["objective"], r["log_every"]) for r in rows] == [
        ("cots", 1),
        ("cots, log every 10", 10),
    ]
    assert all(r["samples_per_s"] > 0 for r in rows)
    bad = CliRunner().invoke(main, ["bench", "train", "--log-every", "0"])
    assert bad.exit_code != 0
    assert "--log-every" in bad.output
