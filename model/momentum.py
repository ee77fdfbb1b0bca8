"""Momentum (EMA) copies and the aligned feature queues of instance-level contrastive learning."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter."""
    for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
        p_target.mul_(momentum).add_(p_online.detach(), alpha=1.0 - momentum)
    for b_online, b_target in zip(online.buffers(), target.buffers(), strict=True):
        b_target.copy_(b_online)


class FeatureQueues(nn.Module):
    """Image keys, text keys and their group ids, written at one shared pointer.

    Column j of the image queue and column j of the text queue always come from the same pair,
    which is what the task-level KL alignment relies on. Entries not yet written are invalid
    (``valid_mask``), so a young queue never supplies made-up negatives.
    """

    image: torch.Tensor
    text: torch.Tensor
    groups: torch.Tensor
    captions: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("image", torch.zeros(size, dim))
        self.register_buffer("text", torch.zeros(size, dim))
        self.register_buffer("groups", torch.full((size,), -1, dtype=torch.long))
        # caption ids of the pairs (model.losses.caption_ids), for caption-level positives
        self.register_buffer("captions", torch.zeros(size, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(
        self,
        image_keys: torch.Tensor,
        text_keys: torch.Tensor,
        groups: torch.Tensor,
        captions: torch.Tensor | None = None,
    ) -> None:
        """Write a batch of aligned keys [N, D] at the pointer, wrapping around."""
        if self.size == 0:
            return
        if captions is None:
            captions = torch.zeros_like(groups)
        if image_keys.shape[0] > self.size:  # only the newest keys fit
            image_keys, text_keys, groups, captions = (
                t[-self.size :] for t in (image_keys, text_keys, groups, captions)
            )
        n = image_keys.shape[0]
        index = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.image[index] = image_keys.to(self.image.dtype)
        self.text[index] = text_keys.to(self.text.dtype)
        self.groups[index] = groups
        self.captions[index] = captions
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def valid_mask(self) -> torch.Tensor:
        # Writing starts at 0 and proceeds in order, so the first `filled` slots are the valid ones.
        return torch.arange(self.size, device=self.filled.device) < self.filled

    def newest_mask(self, count: int) -> torch.Tensor:
        """Valid slots among the ``count`` most recently written ones (a queue that grows)."""
        age = (self.ptr - 1 - torch.arange(self.size, device=self.ptr.device)) % max(1, self.size)
        return self.valid_mask() & (age < count)
