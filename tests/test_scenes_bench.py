"""``cots bench scenes``: the demo's scene queries split by kind and scene size, on a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from click.testing import CliRunner

from cots.cli import cli as main
from tests.test_querybank import trained  # noqa: F401  (the shared trained-run fixture)


def test_scenes_bench_splits_the_queries_and_the_captions(
    trained: tuple[Path, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    run, corpus = trained
    out = tmp_path / "scenes.md"
    args = ["bench", "scenes", "--run", str(run), "--threads", "1", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    measured = json.loads(out.with_suffix(".json").read_text())
    queries = measured["scene_queries"]
    kinds = [name for name in queries if name in ("place", "relation", "object")]
    assert queries["all"]["n"] == sum(queries[k]["n"] for k in kinds) > 0
    by_size = [name for name in queries if name.startswith("relation, ")]
    if "relation" in queries:  # every relation query is true of its own scene: one size each
        assert sum(queries[name]["n"] for name in by_size) == queries["relation"]["n"]
    with (corpus / "images.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    captions = measured["test_captions"]
    assert sum(group["n"] for group in captions.values()) == sum(
        row["split"] == "test" for row in rows
    )
    assert all(name.endswith("-object images") for name in captions)
    for group in [*queries.values(), *captions.values()]:
        assert 0.0 <= group["@1"] <= group["@5"] <= 100.0
    assert measured["gallery"] == len({row["image_id"] for row in rows})
    assert result.output.startswith("# Scene queries by kind and scene size")
    assert "| all | " in out.read_text()


def test_scenes_bench_names_what_is_wrong(trained: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    run, corpus = trained
    empty = tmp_path / "empty-run"
    empty.mkdir()
    missing = CliRunner().invoke(main, ["bench", "scenes", "--run", str(empty)])
    assert missing.exit_code == 1
    assert "no checkpoint.pt" in missing.output
    # a corpus without scene specs (not synthetic): refused by name
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "images.csv").write_text((corpus / "images.csv").read_text())
    refused = CliRunner().invoke(
        main, ["bench", "scenes", "--run", str(run), "--corpus", str(plain)]
    )
    assert refused.exit_code == 1
    assert "not synthetic" in refused.output
