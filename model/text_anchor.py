"""Text anchoring: fine-tune a text tower without moving what it already embeds.

Used when a video model trains the text tower of an image run whose bundle serves images too:
the images collection was embedded for the image run's text tower, so a text tower that drifts
while learning "moves from left to right" makes image search worse. The anchor keeps a frozen
copy of the starting towers and, each step, samples captions of the image corpus and adds
``weight * mean(1 - cos(student, teacher))`` over them: new words may move, old sentences keep
their embeddings.

Data flow: train.py reads the anchor CSV's captions once (tokens [N, L]); ClipObjective calls
:meth:`TextAnchor.forward` with the online towers each step; the sample uses the global torch
generator, whose state the checkpoint keeps, so a resumed run samples identically.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from model.factory import Towers


class TextAnchor(nn.Module):
    def __init__(self, towers: Towers, tokens: torch.Tensor, batch_size: int) -> None:
        super().__init__()
        self.teacher = copy.deepcopy(towers).requires_grad_(False).eval()
        self.register_buffer("tokens", tokens, persistent=False)
        self.batch_size = batch_size

    def forward(self, towers: Towers, buckets: int = 1) -> torch.Tensor:
        tokens: torch.Tensor = self.tokens  # type: ignore[assignment]
        rows = torch.randint(len(tokens), (self.batch_size,)).to(tokens.device)
        sample = tokens[rows]
        student = F.normalize(towers.text_features(sample, buckets)[0].float(), dim=-1)
        with torch.no_grad():
            teacher = F.normalize(self.teacher.text_features(sample, buckets)[0].float(), dim=-1)
        return (1 - (student * teacher).sum(dim=-1)).mean()
