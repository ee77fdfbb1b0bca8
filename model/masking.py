"""Masking for the token-level objectives: BERT-style text masking, block-wise patch masking.

Both take an explicit ``torch.Generator`` so a resumed run masks exactly as the original did.
"""

from __future__ import annotations

import math
from functools import cache

import torch

IGNORE_INDEX = -100  # label of positions that are not predicted (cross_entropy's default)


def mask_text_tokens(
    tokens: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_ids: tuple[int, ...],
    generator: torch.Generator,
    mask_prob: float = 0.15,
    replacement_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of token ids [B, L]: returns (masked tokens, labels).

    Of the non-special positions, ``mask_prob`` are chosen (at least one per caption that has
    any); of those 80 % become ``mask_token_id``, 10 % a random ordinary token, 10 % stay.
    Labels hold the original id at chosen positions and IGNORE_INDEX elsewhere. Special tokens
    (start, end, padding) are never chosen. The random tokens are drawn from
    ``replacement_ids`` when given (the MLM head's corpus vocabulary: BERT draws them from the
    words it predicts among), else from every ordinary id below ``vocab_size``.
    """
    special = torch.zeros_like(tokens, dtype=torch.bool)
    for token_id in special_ids:
        special |= tokens == token_id
    candidates = ~special
    scores = torch.rand(tokens.shape, generator=generator)
    chosen = (scores < mask_prob) & candidates
    # A caption with candidates but nothing chosen gets its best-scoring candidate, so every
    # caption contributes to the loss.
    empty = ~chosen.any(dim=1) & candidates.any(dim=1)
    if bool(empty.any()):
        best = scores.masked_fill(~candidates, 2.0).argmin(dim=1)
        chosen[empty, best[empty]] = True
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    action = torch.rand(tokens.shape, generator=generator)
    masked = tokens.clone()
    masked[chosen & (action < 0.8)] = mask_token_id
    ordinary = (
        _ordinary_ids(vocab_size, (*special_ids, mask_token_id))
        if replacement_ids is None
        else replacement_ids
    )
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    picks = torch.randint(len(ordinary), (int(to_random.sum()),), generator=generator)
    masked[to_random] = ordinary[picks]
    return masked, labels


@cache
def _ordinary_ids(vocab_size: int, excluded: tuple[int, ...]) -> torch.Tensor:
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[[i for i in excluded if i < vocab_size]] = False
    return keep.nonzero().squeeze(1)


def block_mask(
    grid: tuple[int, int],
    ratio: float,
    *,
    generator: torch.Generator,
    min_block: int = 2,
    max_aspect: float = 3.0,
    max_tries: int = 100,
) -> torch.Tensor:
    """Bool mask [H, W] over a patch grid, True = masked, built from random rectangles.

    BEiT's block-wise masking: rectangles of random area and aspect ratio are added until about
    ``ratio`` of the patches are masked (never more than ``ceil(ratio * H * W)``).
    """
    height, width = grid
    total = height * width
    target = min(total, math.ceil(ratio * total))
    mask = torch.zeros(grid, dtype=torch.bool)
    log_aspect = math.log(max_aspect)
    for _ in range(max_tries * max(1, target)):
        remaining = target - int(mask.sum())
        if remaining <= 0:
            break
        area = float(
            torch.empty(()).uniform_(min_block, max(min_block, remaining), generator=generator)
        )
        aspect = math.exp(
            float(torch.empty(()).uniform_(-log_aspect, log_aspect, generator=generator))
        )
        h = max(1, min(height, round(math.sqrt(area * aspect))))
        w = max(1, min(width, round(math.sqrt(area / aspect))))
        top = int(torch.randint(height - h + 1, (), generator=generator))
        left = int(torch.randint(width - w + 1, (), generator=generator))
        block = mask[top : top + h, left : left + w]
        new = int((~block).sum())
        if 0 < new <= remaining:
            block.fill_(True)
    return mask


def block_masks(
    batch: int, grid: tuple[int, int], ratio: float, *, generator: torch.Generator
) -> torch.Tensor:
    """[B, H*W] flattened block masks, one per image."""
    return torch.stack(
        [block_mask(grid, ratio, generator=generator).flatten() for _ in range(batch)]
    )
