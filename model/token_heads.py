"""Masked vision-language modeling without a fusion module: small prediction heads.

Each head predicts the masked units of one modality from that tower's own token states,
joined (added, after a projection) with the paired item's global feature from the other
tower. No cross-attention: the only channel from the other modality is one vector, which is
what pushes the global features to carry the details the masked tokens need.
"""

from __future__ import annotations

import torch
from torch import nn

from model.errors import ModelError


class _Predictor(nn.Module):
    """token state [N, W] + other modality's global feature [N, D] -> hidden [N, W]."""

    def __init__(self, width: int, embed_dim: int) -> None:
        super().__init__()
        self.context = nn.Linear(embed_dim, width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))

    def forward(self, states: torch.Tensor, other_global: torch.Tensor) -> torch.Tensor:
        return self.mlp(states + self.context(other_global))


class MlmHead(nn.Module):
    """Masked language modeling; the output layer is tied to the text tower's token embedding
    (a 49k-row output matrix of its own would dwarf our small towers).

    With ``vocab`` (sorted token ids: the words the training captions use), a masked word is
    predicted among those ids only: the logits are the rows ``vocab`` of the full head's, so a
    step scores a few hundred words instead of 49,409 and only those embedding rows get a
    gradient from the head. ``vocab`` is a buffer: checkpoints carry it.
    """

    vocab: torch.Tensor | None

    def __init__(
        self, text_width: int, embed_dim: int, vocab_size: int, vocab: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.predictor = _Predictor(text_width, embed_dim)
        self.bias = nn.Parameter(torch.zeros(vocab_size if vocab is None else len(vocab)))
        # None registers nothing: the full head's state dict stays as it was
        self.register_buffer("vocab", None if vocab is None else vocab.long().clone())

    def forward(
        self, states: torch.Tensor, image_global: torch.Tensor, token_embedding: torch.Tensor
    ) -> torch.Tensor:
        """Masked positions' states [N, W_t], their captions' images' globals [N, D], the text
        tower's embedding matrix [V, W_t] -> logits [N, V] (with ``vocab``: [N, len(vocab)])."""
        hidden = self.predictor(states, image_global)
        if self.vocab is not None:
            token_embedding = token_embedding[self.vocab]
        return hidden @ token_embedding.t() + self.bias

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Token ids [N] -> the logits' columns that stand for them (with ``vocab``: their
        positions in it; without, the ids themselves)."""
        if self.vocab is None:
            return labels
        positions = torch.searchsorted(self.vocab, labels).clamp(max=len(self.vocab) - 1)
        if not bool((self.vocab[positions] == labels).all()):
            missing = labels[self.vocab[positions] != labels].unique()[:5].tolist()
            raise ModelError(
                f"masked words {missing} are not in the MLM head's corpus vocabulary "
                "(mlm_vocab corpus predicts only the ids of the training captions)"
            )
        return positions


class MvmHead(nn.Module):
    """Masked vision modeling: visual-token (codebook id) logits for masked patches."""

    def __init__(self, image_width: int, embed_dim: int, codebook_size: int) -> None:
        super().__init__()
        self.mask_embedding = nn.Parameter(torch.randn(image_width) * 0.02)
        self.predictor = _Predictor(image_width, embed_dim)
        self.out = nn.Linear(image_width, codebook_size)

    def forward(self, states: torch.Tensor, text_global: torch.Tensor) -> torch.Tensor:
        """Masked patches' states [N, W_v], their images' captions' globals [N, D] -> [N, K]."""
        return self.out(self.predictor(states, text_global))
