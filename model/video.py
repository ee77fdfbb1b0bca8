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
    """Frame features [B, T, D] -> one video feature [B, D].

    The temporal variant reads a fixed number of frames (``frames``, the count the video tower
    samples): position embeddings tell the transformer which frame is which, and its outputs
    are concatenated in time order before the projection. Concatenation makes the output depend
    on order from the first step; a mean over the outputs would only see order through
    attention, a second-order effect the time-order loss could barely move in 120 steps.
    The result is added to the frame mean, so training starts from mean pooling.
    """

    def __init__(
        self,
        dim: int,
        frames: int,
        kind: Literal["temporal", "mean"] = "temporal",
        layers: int = 2,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.frames = frames
        if kind == "temporal":
            self.norm_in = nn.LayerNorm(dim)
            self.position = nn.Parameter(torch.randn(frames, dim) * 0.02)
            layer = nn.TransformerEncoderLayer(
                dim, heads, dim_feedforward=4 * dim, dropout=0.0, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.proj = nn.Linear(frames * dim, dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean":
            return frames.mean(dim=1)
        if frames.shape[1] != self.frames:
            raise ValueError(
                f"{frames.shape[1]} frames given; this temporal model reads exactly {self.frames}"
            )
        x = self.norm_in(frames) + self.position
        x = self.norm(self.encoder(x))
        return frames.mean(dim=1) + self.proj(x.flatten(1))
