"""Teach a frozen text tower new words without moving the old ones.

The video run starts from the image run's towers and must learn words image captions never had
("moves", "slides", "rises", "shrinks", "leftwards"), while every text the images collection is
searched with must embed exactly as the image run embedded it (the collection's vectors came
from the image run's image tower, and they match only that text tower).

Data flow: the tower stays frozen (``freeze: [text]``); :func:`learn_only_new_words` makes its
token-embedding matrix trainable again, with a gradient hook that zeroes the rows of every id
in ``seen`` (the image captions' token ids) and a mark that keeps the matrix out of weight
decay. AdamW then leaves those rows bit for bit as they were (a zero gradient gives zero
moments and a zero step; decoupled weight decay is the one thing that would still move them).
A text made only of seen ids passes through unchanged weights, so it embeds exactly as before;
a text with a new word gets that word's learnt embedding.
"""

from __future__ import annotations

from typing import Final

import torch

from model.errors import ModelError
from model.factory import Towers

# Parameter attribute that training's param_groups reads: no weight decay for this one.
NO_WEIGHT_DECAY: Final = "no_weight_decay"


def learn_only_new_words(towers: Towers, seen: torch.Tensor) -> int:
    """Make the text tower's token embeddings of ids not in ``seen`` (token ids, any shape)
    trainable and keep the others fixed; returns how many ids can learn."""
    embedding = getattr(towers.text, "token_embedding", None)
    if not isinstance(embedding, torch.nn.Embedding):
        raise ModelError("learn_new_words needs a text tower with a token embedding")
    weight = embedding.weight
    frozen = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
    frozen[seen.reshape(-1).to(weight.device)] = True
    weight.requires_grad_(True)
    setattr(weight, NO_WEIGHT_DECAY, True)
    weight.register_hook(lambda grad: grad.masked_fill(frozen.to(grad.device), 0.0))
    return int((~frozen).sum())
