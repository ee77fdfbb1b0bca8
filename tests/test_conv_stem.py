"""The convolutional stem (``image_stem: conv``): same token grid as the patch embedding, a
tower that trains, resumes exactly, stays put when frozen, and masks patches for MVM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from model.config import TrainConfig
from model.conv_stem import conv_stem
from model.data.synth import SynthConfig, generate_corpus
from model.errors import ModelError
from model.factory import build_towers
from tests.test_training import _assert_resume_is_exact, micro
from training.eval_splits import towers_from_checkpoint
from training.train import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("conv-stem-corpus") / "corpus"
    generate_corpus(out, SynthConfig(seed=1, n_images=200, n_videos=0, image_size=32), workers=2)
    return out / "images.csv"


@pytest.mark.parametrize(("patch", "side"), [(8, 32), (16, 64), (32, 64)])
def test_the_stem_ends_in_the_patch_embeddings_grid(patch: int, side: int) -> None:
    linear = nn.Conv2d(3, 48, patch, stride=patch)
    stem = conv_stem(patch, 48)
    images = torch.randn(2, 3, side, side)
    assert stem(images).shape == linear(images).shape == (2, 48, side // patch, side // patch)


@pytest.mark.parametrize("patch", [4, 12, 7])
def test_patch_sizes_the_stem_cannot_reach_are_refused(patch: int) -> None:
    with pytest.raises(ModelError, match="power-of-two patch size"):
        conv_stem(patch, 48)


def test_the_stem_sees_inside_a_patch_where_the_linear_embedding_cannot_tell_offsets() -> None:
    """A 2-pixel dot moved by one pixel inside one patch: the stem's token changes with the
    move non-linearly (GELU after overlapping kernels), so two moves that cancel in a linear
    map do not cancel here."""
    torch.manual_seed(0)
    stem = conv_stem(8, 16)

    def dot(y: int, x: int) -> torch.Tensor:
        image = torch.zeros(1, 3, 32, 32)
        image[..., y : y + 2, x : x + 2] = 1.0
        return image

    a, b, c = dot(2, 2), dot(2, 4), dot(2, 3)
    with torch.no_grad():
        # Linear: f(a) + f(b) = f(a + b); a non-linear stem breaks the identity.
        gap = stem(a) + stem(b) - stem(a + b)
        assert gap.abs().max() > 1e-3
        assert not torch.allclose(stem(a), stem(c))


def test_towers_with_a_conv_stem_keep_their_token_shapes_and_mask_patches(tmp_path: Path) -> None:
    plain = build_towers(TrainConfig(model="cots-micro"))
    towers = build_towers(TrainConfig(model="cots-micro", image_stem="conv"))
    assert isinstance(towers.visual.conv1, nn.Sequential)
    images = torch.randn(3, 3, 32, 32)
    pooled, tokens = towers.image_features(images)
    plain_pooled, plain_tokens = plain.image_features(images)
    assert pooled.shape == plain_pooled.shape
    assert tokens.shape == plain_tokens.shape
    grid = towers.patch_grid
    mask = torch.zeros(3, grid[0] * grid[1], dtype=torch.bool)
    mask[:, 0] = True
    masked = towers.masked_patch_tokens(images, mask, torch.zeros(tokens.shape[-1]))
    assert masked.shape == tokens.shape
    assert not torch.allclose(masked, tokens)


def trained_towers(checkpoint: Path) -> nn.Module:
    return towers_from_checkpoint(checkpoint)[0]


def test_a_conv_stem_run_resumes_exactly(corpus: Path, tmp_path: Path) -> None:
    _assert_resume_is_exact(corpus, tmp_path, image_stem="conv")
    state = trained_towers(tmp_path / "straight" / "checkpoint.pt").state_dict()
    assert any(k.startswith("visual.conv1.0.") for k in state)


def test_a_frozen_conv_stem_tower_does_not_move(corpus: Path, tmp_path: Path) -> None:
    """No BatchNorm: a frozen image tower (the video run's) has no running statistics that a
    forward pass in training mode would update."""
    clip: dict[str, Any] = {"kind": "clip", "queue_size": 0}
    data: dict[str, Any] = {"val_split": None, "eval_splits": []}
    first = micro(corpus, tmp_path / "a", objective=clip, data=data, epochs=1, image_stem="conv")
    train(first, progress=False)
    source = trained_towers(tmp_path / "a" / "checkpoint.pt").state_dict()
    frozen = micro(
        corpus,
        tmp_path / "b",
        objective=clip,
        data=data,
        epochs=1,
        image_stem="conv",
        freeze=["image"],
        init_from=str(tmp_path / "a" / "checkpoint.pt"),
    )
    train(frozen, progress=False)
    after = trained_towers(tmp_path / "b" / "checkpoint.pt").state_dict()
    mismatched = micro(
        corpus,
        tmp_path / "c",
        objective=clip,
        data=data,
        epochs=1,
        freeze=["image"],
        init_from=str(tmp_path / "a" / "checkpoint.pt"),
    )
    with pytest.raises(ModelError, match="'conv' stem and this run's the 'patch' one"):
        train(mismatched, progress=False)
    visual = [k for k in source if k.startswith("visual.")]
    assert any(k.startswith("visual.conv1.0.") for k in visual)
    assert all(torch.equal(source[k], after[k]) for k in visual)
