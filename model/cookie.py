"""COOKIE's weight-sharing head: one transformer block stack over both towers' token outputs.

The image tower's patch tokens and the text tower's token states are each projected to one
width, then run through the *same* blocks, pooled and projected with the *same* output layer.
Sharing the weights pulls the two modalities' token spaces together. The head's output is
added to the tower's own global feature, so training starts from the two-tower model and the
head learns a correction on top.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class SharedHead(nn.Module):
    def __init__(
        self,
        image_width: int,
        text_width: int,
        width: int,
        embed_dim: int,
        layers: int = 1,
        heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.image_in = nn.Linear(image_width, width)
        self.text_in = nn.Linear(text_width, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim)

    def forward(
        self,
        tokens: torch.Tensor,
        modality: Literal["image", "text"],
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens [B, N, W_modality] (``valid`` [B, N] marks real text tokens) -> [B, D]."""
        x = (self.image_in if modality == "image" else self.text_in)(tokens)
        padding = None if valid is None else ~valid
        x = self.norm(self.blocks(x, src_key_padding_mask=padding))
        if valid is None:
            pooled = x.mean(dim=1)
        else:
            weights = valid.unsqueeze(-1).to(x.dtype)
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return self.proj(pooled)


def text_valid_mask(tokens: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """[B, L] True up to and including the last non-padding token (the end-of-text token)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    last = torch.where(tokens != pad_id, positions, torch.zeros_like(positions)).amax(dim=1)
    return positions[None, :] <= last[:, None]
