"""Temporal pooling of the video tower: frame features -> one video feature.

The frames go through the image tower (``Towers`` takes 5-D input when it has a
``temporal`` module); this module turns their features into one.

``temporal`` adds learned temporal position embeddings and runs a transformer over the frame
features, so the order of frames matters; ``mean`` averages frame features, which cannot tell
a video from its reverse. The synthetic videos' captions depend on order, which separates them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class TemporalPooling(nn.Module):
    """Frame features [B, T, D] -> one video feature [B, D]."""

    def __init__(
        self,
        dim: int,
        max_frames: int,
        kind: Literal["temporal", "mean"] = "temporal",
        layers: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.max_frames = max_frames
        if kind == "temporal":
            # Frames are layer-normed before the positions are added, and the positions start at
            # a comparable scale: at 0.02 next to raw frame features the order signal was too
            # faint for the time-order loss to find in a hundred steps.
            self.norm_in = nn.LayerNorm(dim)
            self.position = nn.Parameter(torch.randn(max_frames, dim) * 0.5)
            layer = nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.proj = nn.Linear(dim, dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.shape[1] > self.max_frames:
            raise ValueError(f"{frames.shape[1]} frames, at most {self.max_frames} supported")
        if self.kind == "mean":
            return frames.mean(dim=1)
        x = self.norm_in(frames) + self.position[: frames.shape[1]]
        x = self.norm(self.encoder(x))
        # residual to the mean so training starts from mean pooling and learns order on top
        return frames.mean(dim=1) + self.proj(x.mean(dim=1))
