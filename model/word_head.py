"""Caption-word prediction from the image embedding (``objective.word_prediction``).

SuperClass (Huang et al., "Classification done right for vision-language pre-training",
NeurIPS 2024) trains an image tower by predicting its caption's tokens, as a classifier with
IDF-weighted multi-hot targets, and matches contrastive pre-training with it. Here it is added
to the contrastive objective, for what the contrastive loss leaves out: an image need only beat
the batch's other captions, and most of those differ in colour or place already, so nothing
asks the tower for the shape (issue 40: the demo's image tower tells shapes apart linearly
55 % of the time; the same tower trained on shape labels, 99.7 %).

Data flow: the training split's captions (token ids) -> :func:`word_vocabulary` -> the sorted
ids they use (``aux_inputs.mlm_corpus_vocab``: less padding, start, end and [MASK]) and each
one's inverse document frequency over the captions; per step, the batch's captions [B, L] ->
:meth:`WordHead.targets` -> [B, V], each caption's words weighted by IDF and normalised to sum 1
(so "a" and "the", in every caption, weigh nothing); its images' embeddings [B, D] ->
:meth:`WordHead.forward` (on the normalised embedding, the one retrieval uses) -> logits [B, V];
:func:`word_loss` -> softmax cross-entropy against the targets over the pairs the noise filter
kept.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from model.aux_inputs import mlm_corpus_vocab
from model.errors import ModelError

# The normalised embedding is scaled before the linear map so that logits of a useful range
# need no large weights (weight decay pulls on those); the probe of issue 40 used the same.
INPUT_SCALE = 10.0


def word_vocabulary(tokens: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions' token ids (tensors [n, L], e.g. a split's per item) -> (the sorted ids they
    use, less special ones [V]; each id's inverse document frequency log(N / df) [V])."""
    tokens = list(tokens)
    rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens]).long()
    if len(rows) == 0:
        raise ModelError("word prediction needs training captions; the split has none")
    # the captions' words, as masked language modeling's corpus vocabulary has them
    vocab = mlm_corpus_vocab(tokens).long()
    if len(vocab) == 0:
        raise ModelError("word prediction needs captions with words; these have none")
    # document frequency: each id counted once per caption (its first place in the sorted row)
    ordered = rows.sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    frequency = torch.bincount(ordered[first])
    idf = torch.log(len(rows) / frequency[vocab].double()).float()
    return vocab, idf


class WordHead(nn.Module):
    """A linear map from the normalised image embedding to the vocabulary's words; the
    vocabulary and its IDF weights are buffers, so checkpoints carry them."""

    vocab: torch.Tensor
    idf: torch.Tensor

    def __init__(self, embed_dim: int, vocab: torch.Tensor, idf: torch.Tensor) -> None:
        super().__init__()
        if vocab.shape != idf.shape or vocab.ndim != 1:
            raise ModelError("the word vocabulary and its IDF weights must be [V] each")
        self.linear = nn.Linear(embed_dim, len(vocab))
        self.register_buffer("vocab", vocab.long().clone())
        self.register_buffer("idf", idf.float().clone())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, D] (not normalised) -> word logits [B, V]."""
        return self.linear(INPUT_SCALE * F.normalize(image, dim=-1))

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """Captions [B, L] -> [B, V]: each caption's vocabulary words (once each, however
        often it says them), IDF-weighted and summing to 1; all zeros for a caption with none
        (a word outside the vocabulary counts for nothing)."""
        positions = torch.searchsorted(self.vocab, tokens.long()).clamp(max=len(self.vocab) - 1)
        known = (self.vocab[positions] == tokens).float()
        hot = torch.zeros(tokens.shape[0], len(self.vocab), device=tokens.device)
        hot.scatter_reduce_(1, positions, known, reduce="amax")
        weighted = hot * self.idf
        return weighted / weighted.sum(dim=1, keepdim=True).clamp(min=1e-12)


def word_loss(
    logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Softmax cross-entropy against the target distributions, averaged over the kept rows
    that have any target; and how often the top word is one of the caption's."""
    has_words = (targets.sum(dim=1) > 0).float() * keep.float()
    losses = -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=1)
    top = logits.argmax(dim=1, keepdim=True)
    hit = (targets.gather(1, top)[:, 0] > 0).float()
    weight = has_words.sum().clamp(min=1)
    return (losses * has_words).sum() / weight, float(((hit * has_words).sum() / weight).detach())
