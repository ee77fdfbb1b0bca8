"""The CLIP baseline (``ClipObjective``) under DDP scores each rank's pairs against the whole
global batch, as open_clip's ``ClipLoss`` does: two gloo processes on halves of a batch give
the loss of the whole batch in one process, and every rank's gradient reaches its own
features."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import ObjectiveConfig
from model.distributed import DistInfo, all_gather_cat, all_gather_keeping_grad
from model.factory import create_towers
from model.losses import clip_loss
from model.objectives import ClipObjective, Features, OnlineModel
from tests.gloo import run_ranks, save_result

HALF = 4
DIM = 8
TEMPERATURE = torch.tensor(0.1)


def _whole_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    image = torch.nn.functional.normalize(torch.randn(2 * HALF, DIM, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(2 * HALF, DIM, generator=generator), dim=-1)
    # Groups 2 and 5 hold two pairs each, across the ranks' halves: positives of each other.
    groups = torch.tensor([0, 1, 2, 3, 2, 5, 6, 5])
    return image, text, groups


def _rank_loss(rank: int, folder: Path) -> None:
    info = DistInfo(rank=rank, world_size=2)
    image, text, groups = _whole_batch()
    rows = slice(rank * HALF, (rank + 1) * HALF)
    local_image = image[rows].clone().requires_grad_(True)
    local_text = text[rows].clone().requires_grad_(True)
    config = ObjectiveConfig(kind="clip")
    objective = ClipObjective(OnlineModel(create_towers("cots-micro"), config), config, info)
    empty = torch.zeros(HALF, 1, DIM)
    features = Features(local_image, empty, local_text, empty, TEMPERATURE)
    loss = objective(features, groups[rows], online=None, images=None).loss
    loss.backward()
    assert local_image.grad is not None
    assert local_text.grad is not None
    result = {"loss": loss.detach(), "image_grad": local_image.grad, "text_grad": local_text.grad}
    save_result(result, rank, folder)


@pytest.mark.slow
def test_two_ranks_score_their_pairs_against_the_whole_batch(tmp_path: Path) -> None:
    ranks = run_ranks(_rank_loss, tmp_path)
    image, text, groups = _whole_batch()
    i2t, t2i = clip_loss(image, text, groups, TEMPERATURE)
    whole = (i2t.mean() + t2i.mean()) / 2
    # Each rank's rows against every column: the mean of the ranks' losses is the whole batch's.
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, whole, atol=1e-6)
    # Not the loss of each half alone (which a rank ignoring the others would compute).
    for rank, result in enumerate(ranks):
        rows = slice(rank * HALF, (rank + 1) * HALF)
        alone_i2t, alone_t2i = clip_loss(image[rows], text[rows], groups[rows], TEMPERATURE)
        alone = (alone_i2t.mean() + alone_t2i.mean()) / 2
        assert not torch.allclose(result["loss"], alone, atol=1e-4), rank
        assert result["image_grad"].abs().sum() > 0
        assert result["text_grad"].abs().sum() > 0


def test_one_process_is_the_plain_in_batch_loss() -> None:
    image, text, groups = _whole_batch()
    info = DistInfo()
    batch = (
        all_gather_keeping_grad(image, info),
        all_gather_keeping_grad(text, info),
        all_gather_cat(groups, info),
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            clip_loss(image, text, groups, TEMPERATURE, batch),
            clip_loss(image, text, groups, TEMPERATURE),
            strict=True,
        )
    )
