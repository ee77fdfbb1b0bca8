"""Building blocks of the token-level and video objectives."""

from __future__ import annotations

import torch

from model.factory import create_towers
from model.masking import IGNORE_INDEX, block_mask, block_masks, mask_text_tokens
from model.video import TemporalPooling

SOT, EOT, MASK, VOCAB = 49406, 49407, 49408, 49409


def captions(batch: int, length: int, used: int, generator: torch.Generator) -> torch.Tensor:
    tokens = torch.zeros(batch, length, dtype=torch.long)
    tokens[:, 0] = SOT
    tokens[:, 1 : used + 1] = torch.randint(1, 49000, (batch, used), generator=generator)
    tokens[:, used + 1] = EOT
    return tokens


def test_text_masking_ratio_and_80_10_10_split() -> None:
    g = torch.Generator().manual_seed(0)
    tokens = captions(512, 48, 30, g)
    masked, labels = mask_text_tokens(
        tokens, mask_token_id=MASK, vocab_size=VOCAB, special_ids=(0, SOT, EOT), generator=g
    )
    chosen = labels != IGNORE_INDEX
    assert abs(float(chosen.sum()) / (512 * 30) - 0.15) < 0.01
    assert torch.equal(labels[chosen], tokens[chosen])
    became_mask = float((masked[chosen] == MASK).float().mean())
    unchanged = float((masked[chosen] == tokens[chosen]).float().mean())
    assert abs(became_mask - 0.8) < 0.03
    assert abs(unchanged - 0.1) < 0.03  # (a random replacement rarely equals the original)
    assert torch.equal(masked[~chosen], tokens[~chosen])


def test_special_tokens_are_never_masked_and_every_caption_gets_one() -> None:
    g = torch.Generator().manual_seed(1)
    tokens = captions(256, 16, 2, g)  # short captions: 2 ordinary tokens each
    masked, labels = mask_text_tokens(
        tokens, mask_token_id=MASK, vocab_size=VOCAB, special_ids=(0, SOT, EOT), generator=g
    )
    special = (tokens == 0) | (tokens == SOT) | (tokens == EOT)
    assert not (labels[special] != IGNORE_INDEX).any()
    assert torch.equal(masked[special], tokens[special])
    assert ((labels != IGNORE_INDEX).sum(dim=1) >= 1).all()
    assert not ((masked == SOT) | (masked == EOT))[~special].any()  # random picks are ordinary


def test_text_masking_is_reproducible_from_the_generator() -> None:
    tokens = captions(8, 48, 20, torch.Generator().manual_seed(2))
    a, b = (
        mask_text_tokens(
            tokens,
            mask_token_id=MASK,
            vocab_size=VOCAB,
            special_ids=(0, SOT, EOT),
            generator=torch.Generator().manual_seed(5),
        )
        for _ in range(2)
    )
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_block_masks_hit_the_ratio_and_form_blocks() -> None:
    g = torch.Generator().manual_seed(0)
    masks = block_masks(200, (8, 8), 0.4, generator=g)
    fractions = masks.float().mean(dim=1)
    assert float(fractions.max()) <= 26 / 64  # never more than ceil(0.4 * 64)
    assert float(fractions.mean()) > 0.35
    # blocks, not scattered patches: most masked patches have a masked 4-neighbour
    grid = masks.view(200, 8, 8)
    neighbour = torch.zeros_like(grid)
    neighbour[:, 1:, :] |= grid[:, :-1, :]
    neighbour[:, :-1, :] |= grid[:, 1:, :]
    neighbour[:, :, 1:] |= grid[:, :, :-1]
    neighbour[:, :, :-1] |= grid[:, :, 1:]
    assert float((grid & neighbour).sum()) / float(grid.sum()) > 0.8
    single = block_mask((8, 8), 0.4, generator=torch.Generator().manual_seed(3))
    assert single.shape == (8, 8)
    assert single.dtype == torch.bool


def test_temporal_pooling_is_order_sensitive_and_mean_pooling_is_not() -> None:
    torch.manual_seed(0)
    frames = torch.randn(2, 8, 32)
    reversed_frames = frames.flip(1)
    temporal = TemporalPooling(32, frames=8, kind="temporal").eval()
    mean = TemporalPooling(32, frames=8, kind="mean")
    assert not torch.allclose(temporal(frames), temporal(reversed_frames), atol=1e-4)
    assert torch.allclose(mean(frames), mean(reversed_frames), atol=1e-6)


def test_towers_embed_videos_through_the_image_tower() -> None:
    towers = create_towers("cots-micro").eval()
    videos = torch.randn(2, 4, 3, 32, 32)
    expected = towers.encode_image(videos[:, 0])
    towers.temporal = TemporalPooling(64, frames=4)
    features = towers.encode_image(videos)
    assert features.shape == (2, 64)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)
    still = videos[:, :1].expand(-1, 4, -1, -1, -1)  # four copies of the first frame
    towers.temporal = TemporalPooling(64, frames=4, kind="mean")
    assert torch.allclose(towers.encode_image(still), expected, atol=1e-5)
    temporal = TemporalPooling(64, frames=4).eval()
    towers.temporal = temporal
    assert not torch.allclose(
        towers.encode_image(videos), towers.encode_image(videos.flip(1)), atol=1e-4
    )
