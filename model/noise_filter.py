"""Adaptive momentum filter: drop likely-noisy pairs before they reach the losses and queues.

Each pair's momentum similarity (momentum image key . momentum text key) is compared with a
threshold that tracks the batch similarity distribution, threshold = EMA of (mean - alpha*std).
Mismatched captions sit in the low tail once the model has learned something, so the filter
only acts after a warm-up.
"""

from __future__ import annotations

import torch
from torch import nn


class AdaptiveMomentumFilter(nn.Module):
    threshold: torch.Tensor
    steps: torch.Tensor

    def __init__(
        self,
        alpha: float,
        ema: float,
        warmup_steps: int,
        enabled: bool = True,
        max_drop: float = 0.5,
    ) -> None:
        super().__init__()
        self.alpha, self.ema, self.warmup_steps, self.enabled = alpha, ema, warmup_steps, enabled
        self.max_drop = max_drop
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, similarities: torch.Tensor) -> None:
        """Move the threshold towards this batch's mean - alpha * std (the first batch sets it)."""
        sims = similarities.float()
        stat = sims.mean() - self.alpha * sims.std(unbiased=False)
        if self.steps == 0:
            self.threshold.copy_(stat)
        else:
            self.threshold.mul_(self.ema).add_(stat, alpha=1.0 - self.ema)
        self.steps += 1

    @property
    def active(self) -> bool:
        return self.enabled and int(self.steps) > self.warmup_steps

    @torch.no_grad()
    def keep_mask(self, similarities: torch.Tensor) -> torch.Tensor:
        """Bool [B]: True for pairs that stay. Everything stays during warm-up or when disabled."""
        if not self.active:
            return torch.ones_like(similarities, dtype=torch.bool)
        keep = similarities >= self.threshold
        # When similarities fall faster than the EMA threshold follows (a loss spike), it can sit
        # above every pair: with all pairs dropped nothing is learnt and nothing recovers (seen
        # in a 30 %-noise run: 40 steps at loss 0). Never drop more than max_drop of a batch.
        min_keep = len(similarities) - int(self.max_drop * len(similarities))
        if int(keep.sum()) < min_keep:
            keep = torch.zeros_like(keep)
            keep[similarities.topk(min_keep).indices] = True
        return keep
