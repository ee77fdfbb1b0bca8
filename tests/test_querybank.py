"""``cots bench querybank``: the hubness of gallery items, and the bench end to end on a run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from benchmarks.querybank import hubness
from cots.cli import cli as main
from model.data.synth import SynthConfig, generate_corpus
from tests.micro import train_micro


def _unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows), dim=1)


def test_hubness_is_the_mean_of_each_items_k_nearest_bank_similarities() -> None:
    items = _unit([1.0, 1.0, 0.0], [0.0, 0.0, 1.0])
    bank = _unit([1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0])
    sims = items @ bank.T
    assert torch.allclose(hubness(items, bank, 1), sims.max(dim=1).values)
    assert torch.allclose(hubness(items, bank, 2), sims.topk(2, dim=1).values.mean(dim=1))
    # k beyond the bank is the whole bank; blocks of one item give the same numbers
    assert torch.allclose(hubness(items, bank, 10), sims.mean(dim=1))
    assert torch.allclose(hubness(items, bank, 2, block=1), hubness(items, bank, 2))
    with pytest.raises(ValueError, match="k must be at least 1"):
        hubness(items, bank, 0)


def test_the_correction_demotes_a_hub_below_the_item_a_query_describes() -> None:
    """A hub sits near every bank query; the item the query is about is near that query only.
    By plain cosine the hub wins; less its hubness, the described item does."""
    bank = _unit([1.0, 0.1, 0.0], [0.0, 1.0, 0.1], [0.1, 0.0, 1.0])
    hub = _unit([1.0, 1.0, 1.0])
    described = _unit([1.0, 0.0, 0.2])
    gallery = torch.cat([hub, described])
    query = _unit([1.0, 0.6, 0.6])
    plain = query @ gallery.T
    assert int(plain.argmax()) == 0  # the hub first
    corrected = plain - 1.0 * hubness(gallery, bank, 3)
    assert int(corrected.argmax()) == 1


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("querybank")
    corpus = root / "corpus"
    generate_corpus(corpus, SynthConfig(seed=5, n_images=120, n_videos=0, image_size=32))
    run = root / "run"
    train_micro(corpus / "images.csv", run, max_steps=3, batch_size=16)
    return run, corpus


def test_querybank_bench_tabulates_each_setting_beside_plain_cosine(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    run, corpus = trained
    out = tmp_path / "querybank.md"
    args = ["bench", "querybank", "--run", str(run), "--k", "1,3", "--beta", "0.5,1"]
    result = CliRunner().invoke(main, [*args, "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    measured = json.loads(out.with_suffix(".json").read_text())
    with (corpus / "images.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert measured["gallery"] == len({row["image_id"] for row in rows})  # every split
    assert measured["bank"] == len({row["caption"] for row in rows if row["split"] == "train"})
    assert measured["val_captions"] == sum(row["split"] == "val" for row in rows)
    assert measured["scene_queries"] > 0  # a synthetic corpus: the demo's check runs
    labels = [r["label"] for r in measured["results"]]
    assert labels == [
        "plain cosine", "k=1, beta=0.5", "k=1, beta=1", "k=3, beta=0.5", "k=3, beta=1"
    ]  # fmt: skip
    for figures in measured["results"]:
        for key in ("val_R@1", "val_R@5", "val_scene@1", "val_scene@5", "scene@1", "scene@5"):
            assert 0.0 <= figures[key] <= 100.0
        assert figures["val_R@1"] <= figures["val_R@5"]
    # chosen on the val scene queries, never on the test ones the demo prints
    best = max(
        measured["results"][1:],
        key=lambda r: (r["val_scene@1"] + r["val_scene@5"], r["val_R@1"], r["val_R@5"]),
    )
    assert measured["chosen"] == best["label"]
    text = out.read_text()
    assert f"| **{best['label']}** |" in text
    assert "| plain cosine |" in text
    assert result.output.startswith("# Querybank normalisation")


def test_querybank_bench_names_what_is_wrong(trained: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = trained
    bad_k = CliRunner().invoke(main, ["bench", "querybank", "--run", str(run), "--k", "0"])
    assert bad_k.exit_code == 2
    assert "each k must be at least 1" in bad_k.output
    bad_beta = CliRunner().invoke(main, ["bench", "querybank", "--run", str(run), "--beta", "x"])
    assert bad_beta.exit_code == 2
    assert "not a comma-separated list of numbers" in bad_beta.output
    empty = tmp_path / "empty-run"
    empty.mkdir()
    missing = CliRunner().invoke(main, ["bench", "querybank", "--run", str(empty)])
    assert missing.exit_code == 1
    assert "no checkpoint.pt in this run folder" in missing.output
