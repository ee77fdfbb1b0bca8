"""``cots bench scene-scoring``: scoring rules without retraining, on a run's scene queries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchmarks.scene_scoring import masked_views, region_masks
from cots.cli import cli as main
from tests.micro import train_micro
from tests.test_querybank import trained  # noqa: F401  (the shared trained-run fixture)


def test_region_masks_cover_the_image_once_per_grid() -> None:
    for grid, views in (("rows+cols", 6), ("cells", 9)):
        masks = region_masks(10, grid)
        assert len(masks) == views
        covered = torch.zeros(10, 10)
        for rows, cols in masks:
            covered[rows, cols] += 1
        # rows and columns cover every pixel twice (once as a row, once as a column)
        assert bool((covered == (2 if grid == "rows+cols" else 1)).all())
    with pytest.raises(ValueError, match="unknown grid"):
        region_masks(10, "quarters")


def test_masked_views_paint_one_region_in_the_median_and_keep_the_rest() -> None:
    images = torch.zeros(2, 3, 6, 6)
    images[0, :, :2, :2] = 5.0  # an "object" in the top left cell of a plain background
    images[1] = torch.arange(3.0)[:, None, None]  # a flat image, one value per channel
    masks = region_masks(6, "cells")
    views = masked_views(images, masks).reshape(2, 9, 3, 6, 6)
    assert torch.equal(views[0, 0], torch.zeros(3, 6, 6))  # the object hidden: background left
    for v in range(1, 9):  # any other cell hidden: the image as it was
        assert torch.equal(views[0, v], images[0])
    assert torch.equal(views[1], images[1].expand(9, 3, 6, 6))


def _bench(run: Path, out: Path, *extra: str) -> dict:
    args = ["bench", "scene-scoring", "--run", str(run), "--threads", "1", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, *extra])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("# Scoring rules on the scene queries")
    return json.loads(out.with_suffix(".json").read_text())


def test_scene_scoring_plain_row_is_the_scenes_bench_and_rules_are_chosen_on_val(
    trained: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    run, _ = trained
    measured = _bench(run, tmp_path / "scoring.md", "--delta", "0,0.01")
    assert measured["word_head"] is False  # the fixture's run has no word head: rule skipped
    labels = [r["label"] for r in measured["results"]]
    assert labels == [
        "plain cosine",
        "rows+cols, delta=0", "rows+cols, delta=0.01", "cells, delta=0", "cells, delta=0.01",
    ]  # fmt: skip
    assert measured["views"] == {"rows+cols": 6, "cells": 9}
    # the plain cosine's test figures are cots bench scenes' own, group for group
    scenes_out = tmp_path / "scenes.md"
    scenes = CliRunner().invoke(
        main, ["bench", "scenes", "--run", str(run), "--threads", "1", "--out", str(scenes_out)]
    )
    assert scenes.exit_code == 0, scenes.output
    by_kind = json.loads(scenes_out.with_suffix(".json").read_text())["scene_queries"]
    assert measured["results"][0]["test"] == by_kind
    for row in measured["results"]:
        for split in ("val", "test"):
            for group in row[split].values():
                assert 0.0 <= group["@1"] <= group["@5"] <= 100.0
    # each rule's choice is its best on the val queries (the mean of @1 and @5)
    for rule, label in measured["chosen"].items():
        rows = [r for r in measured["results"] if r["rule"] == rule]
        best = max((r["val"]["all"]["@1"] + r["val"]["all"]["@5"]) / 2 for r in rows)
        chosen = next(r for r in rows if r["label"] == label)
        assert (chosen["val"]["all"]["@1"] + chosen["val"]["all"]["@5"]) / 2 == best


def test_scene_scoring_uses_the_word_head_of_a_run_that_has_one(
    trained: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, corpus = trained
    run = tmp_path / "words"
    objective = {"queue_size": 16, "word_prediction": {"weight": 1.0}}
    train_micro(corpus / "images.csv", run, objective=objective)
    measured = _bench(run, tmp_path / "scoring.md", "--lambda", "0.1,1", "--delta", "0")
    assert measured["word_head"] is True
    labels = [r["label"] for r in measured["results"]]
    assert labels[:3] == ["plain cosine", "word head, lambda=0.1", "word head, lambda=1"]
    assert set(measured["chosen"]) == {"word head", "rows+cols", "cells"}


def test_scene_scoring_refuses_bad_strengths(
    trained: tuple[Path, Path],  # noqa: F811
) -> None:
    run, _ = trained
    for option, value in (("--lambda", "0"), ("--delta", "-0.1"), ("--lambda", "x")):
        args = ["bench", "scene-scoring", "--run", str(run), option, value]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2
        assert "Invalid value" in result.output


def test_scene_scoring_refuses_a_run_without_a_val_split(
    trained: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    _, corpus = trained
    run = tmp_path / "no-val"
    train_micro(
        corpus / "images.csv", run, data={"train": str(corpus / "images.csv"), "val_split": None}
    )
    result = CliRunner().invoke(main, ["bench", "scene-scoring", "--run", str(run)])
    assert result.exit_code == 1
    assert "no val split to choose settings on" in result.output
