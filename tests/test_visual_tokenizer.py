"""The VQ visual tokenizer: shapes, learning, persistence, ``fit_tokenizer`` and its command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cots.cli import cli
from model.config import DataConfig
from model.data.synth import SynthConfig, generate_corpus
from model.errors import ModelError
from model.visual_tokenizer import (
    TokenizerConfig,
    VisualTokenizer,
    codebook_stats,
    load_tokenizer,
    save_tokenizer,
)
from training.visual_tokenizer_train import _images, fit_tokenizer

SMALL = TokenizerConfig(image_size=32, patch_size=8, codebook_size=32, code_dim=8, hidden=32)
METRICS = {"reconstruction_mse", "baseline_mse", "usage", "perplexity", "train_s"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 synthetic 32-px images: 96 train, 6 val."""
    out = tmp_path_factory.mktemp("tokenizer-corpus") / "corpus"
    generate_corpus(out, SynthConfig(seed=3, n_images=120, n_videos=0, image_size=32), workers=1)
    return out / "images.csv"


@pytest.fixture(scope="module")
def train_images(corpus: Path) -> torch.Tensor:
    return _images(DataConfig(train=corpus), "train", 32)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    # the suite shares a small machine; one thread also keeps the float sums reproducible
    torch.set_num_threads(1)


@pytest.mark.parametrize(
    "config",
    [
        TokenizerConfig(),
        SMALL,
        TokenizerConfig(image_size=32, patch_size=4, codebook_size=16, code_dim=4, hidden=16),
        TokenizerConfig(image_size=48, patch_size=16, codebook_size=8, code_dim=8, hidden=8),
    ],
    ids=["default", "small", "patch4", "patch16"],
)
def test_encode_decode_shapes_and_ids(config: TokenizerConfig) -> None:
    torch.manual_seed(0)
    tokenizer = VisualTokenizer(config).eval()
    side = config.image_size // config.patch_size
    assert tokenizer.grid == (side, side)
    images = torch.randn(3, 3, config.image_size, config.image_size)
    ids = tokenizer.encode(images)
    assert ids.shape == (3, side * side)
    assert ids.dtype == torch.long
    assert int(ids.min()) >= 0
    assert int(ids.max()) < config.codebook_size
    decoded = tokenizer.decode(ids)
    assert decoded.shape == images.shape
    assert not decoded.requires_grad
    reconstruction, loss, flat_ids = tokenizer(images)
    assert reconstruction.shape == images.shape
    assert loss.ndim == 0
    assert torch.equal(flat_ids.view(3, -1), ids)  # eval forward: same codes, no update


def test_ids_are_row_major_over_the_patch_grid() -> None:
    torch.manual_seed(0)
    tokenizer = VisualTokenizer(SMALL).eval()
    images = torch.randn(2, 3, 32, 32)
    ids = tokenizer.encode(images).view(2, 4, 4)
    with torch.no_grad():
        z = torch.nn.functional.normalize(tokenizer.encoder(images), dim=1)  # [B, C, H, W]
    for row, column in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        nearest = (z[:, :, row, column] @ tokenizer.codebook.t()).argmax(dim=1)
        assert torch.equal(ids[:, row, column], nearest)


def test_config_rejects_bad_geometry() -> None:
    with pytest.raises(ModelError, match="power of two"):
        TokenizerConfig(patch_size=6)
    with pytest.raises(ModelError, match="multiple"):
        TokenizerConfig(image_size=60, patch_size=8)


def test_training_on_synthetic_images_lowers_the_loss(train_images: torch.Tensor) -> None:
    torch.manual_seed(0)
    tokenizer = VisualTokenizer(SMALL)
    optimiser = torch.optim.Adam(tokenizer.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        batch = train_images[(step * 32) % 96 : (step * 32) % 96 + 32]
        _, loss, _ = tokenizer(batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.6 * sum(losses[:5])
    stats = codebook_stats(tokenizer.eval().encode(train_images), SMALL.codebook_size)
    assert stats["usage"] > 0.5  # the k-means start and the restarts keep codes in use
    assert stats["perplexity"] > 8


def test_codebook_stats() -> None:
    stats = codebook_stats(torch.tensor([0, 1, 2, 3]), 8)
    assert stats["usage"] == 0.5
    assert stats["perplexity"] == pytest.approx(4.0)
    assert codebook_stats(torch.zeros(10, dtype=torch.long), 4)["perplexity"] == pytest.approx(1)


def test_save_load_round_trip(train_images: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    tokenizer = VisualTokenizer(SMALL)
    tokenizer(train_images[:32])  # one training forward: k-means start and an EMA update
    tokenizer.eval()
    path = tmp_path / "sub" / "tokenizer.pt"
    save_tokenizer(tokenizer, path, {"reconstruction_mse": 0.5})
    loaded = load_tokenizer(path)
    assert loaded.config == SMALL
    assert not loaded.training
    assert torch.equal(loaded.encode(train_images), tokenizer.encode(train_images))
    ids = tokenizer.encode(train_images[:4])
    assert torch.equal(loaded.decode(ids), tokenizer.decode(ids))
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_load_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.pt")
    text = tmp_path / "notes.pt"
    text.write_text("not a tensor file")
    with pytest.raises(ModelError, match="not a loadable visual tokenizer"):
        load_tokenizer(text)
    foreign = tmp_path / "checkpoint.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(ModelError, match="not a COTS visual tokenizer"):
        load_tokenizer(foreign)
    # right format tag, but weights of another layout
    stale = tmp_path / "stale.pt"
    torch.save({"format": "cots-visual-tokenizer", "config": {}, "state": {}}, stale)
    with pytest.raises(ModelError, match="does not match"):
        load_tokenizer(stale)


def test_fit_tokenizer_learns_more_than_the_mean_image_and_is_deterministic(
    corpus: Path, train_images: torch.Tensor
) -> None:
    data = DataConfig(train=corpus)
    # 40 epochs of 3 steps, about 2 s. Over seeds 0-7 the val reconstruction error came to
    # 0.63-0.68 of the mean image's (2.2-2.7 times it after 2 epochs, 0.79-0.85 after 20), with
    # 69-94 % of the codes in use and a perplexity of 15-22.
    tokenizer, metrics = fit_tokenizer(
        data, SMALL, epochs=40, batch_size=32, seed=1, progress=False
    )
    assert set(metrics) == METRICS
    assert all(math.isfinite(v) for v in metrics.values())
    assert 0 < metrics["usage"] <= 1
    assert 1 <= metrics["perplexity"] <= SMALL.codebook_size
    assert metrics["baseline_mse"] > 0
    assert metrics["train_s"] > 0
    # What comes back through the codes is closer to the val images (mean squared error) than
    # the train images' mean image is (a tokenizer that learned nothing), by a clear margin, ...
    assert 0 < metrics["reconstruction_mse"] < 0.8 * metrics["baseline_mse"]
    # ... through many codes, ...
    assert metrics["usage"] > 0.5
    assert metrics["perplexity"] > 8
    # ... and tells the images apart: a train image's reconstruction is nearest to that image
    # among all 96 far more often than chance (1/96; measured 0.24-0.36 over seeds 0-7).
    reconstructions = tokenizer.decode(tokenizer.encode(train_images))
    distances = torch.cdist(reconstructions.flatten(1), train_images.flatten(1))
    own = distances.argmin(dim=1) == torch.arange(len(train_images))
    assert float(own.float().mean()) > 0.1
    assert not tokenizer.training
    again, again_metrics = fit_tokenizer(
        data, SMALL, epochs=40, batch_size=32, seed=1, progress=False
    )
    images = _images(data, "val", 32)
    assert torch.equal(again.encode(images), tokenizer.encode(images))
    assert again_metrics["reconstruction_mse"] == metrics["reconstruction_mse"]


def test_fit_tokenizer_continues_from_a_pretrained_file(corpus: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "start.pt"
    save_tokenizer(VisualTokenizer(SMALL), path, {})
    torch.set_num_threads(2)
    # the file's config wins over the one passed in
    tokenizer, _ = fit_tokenizer(
        DataConfig(train=corpus),
        TokenizerConfig(),
        epochs=1,
        batch_size=64,
        pretrained=path,
        progress=False,
    )
    assert tokenizer.config == SMALL
    assert torch.get_num_threads() == 2  # trained on one thread, then restored
    with pytest.raises(ModelError, match="does not exist"):
        fit_tokenizer(DataConfig(train=corpus), SMALL, pretrained=tmp_path / "nope.pt")


def test_cli_trains_and_writes_a_tokenizer(corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok" / "tokenizer.pt"
    args = ["train-visual-tokenizer", "--data", str(corpus), "--out", str(out)]
    args += ["--image-size", "32", "--codebook-size", "16", "--epochs", "1"]
    args += ["--batch-size", "32", "--seed", "2"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout[result.stdout.index("{") :])
    assert set(metrics) == METRICS
    tokenizer = load_tokenizer(out)
    assert tokenizer.config.codebook_size == 16
    assert tokenizer.grid == (4, 4)
    assert torch.load(out, weights_only=True)["metrics"] == metrics
    bad = CliRunner().invoke(cli, [*args[:5], "--pretrained", str(tmp_path / "none.pt")])
    assert bad.exit_code != 0
    assert "does not exist" in bad.output


def test_the_old_command_name_still_runs_hidden_and_deprecated(tmp_path: Path) -> None:
    """``cots train-tokenizer`` (the command's name before it said "visual") runs the same
    command with a note on stderr, and ``cots --help`` lists only the new name."""
    listed = CliRunner().invoke(cli, ["--help"])
    assert "train-visual-tokenizer" in listed.stdout
    assert "train-tokenizer" not in listed.stdout
    args = [
        "train-tokenizer",
        "--data",
        str(tmp_path / "none.csv"),
        "--out",
        str(tmp_path / "t.pt"),
    ]
    old = CliRunner().invoke(cli, args)
    assert "deprecated" in old.stderr
    assert "train-visual-tokenizer" in old.stderr
    assert old.exit_code == 1  # the command's own error, not click's "no such command" (2)
    assert "does not exist" in old.output
    assert not (tmp_path / "t.pt").exists()
