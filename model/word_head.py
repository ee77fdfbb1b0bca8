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

With ``bigrams`` (``word_prediction.bigrams``) the vocabulary also holds the adjacent word pairs
that at least :data:`MIN_BIGRAM_CAPTIONS` training captions say ("blue star", "star above"),
keyed above every token id (:func:`caption_keys`), and a caption's target names its pairs
beside its words: a bag of words cannot tell "a blue star above a green square" from "a green
star above a blue square", a bag of pairs can, so the shared direction of "blue star" is one
that a green star's image does not take.
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
# A pair's key is (first id << BIGRAM_SHIFT) | second id, above every token id: the tokenisers
# the project ships have fewer than 2**20 ids (CLIP's 49,408).
BIGRAM_SHIFT = 20
# Rarer pairs name one image's caption, not an attribute bound to an object.
MIN_BIGRAM_CAPTIONS = 5


def caption_keys(tokens: torch.Tensor, bigrams: bool) -> torch.Tensor:
    """Captions [B, L] -> their keys [B, K]: the token ids, then with ``bigrams`` each adjacent
    pair's key (pairs with padding or a start or end token are keyed too; no vocabulary holds
    them)."""
    tokens = tokens.long()
    if not bigrams:
        return tokens
    if tokens.numel() and int(tokens.max()) >= 1 << BIGRAM_SHIFT:
        raise ModelError(f"bigram keys need token ids below 2**{BIGRAM_SHIFT}")
    pairs = (tokens[:, :-1] << BIGRAM_SHIFT) | tokens[:, 1:]
    return torch.cat([tokens, pairs], dim=1)


def word_vocabulary(
    tokens: Iterable[torch.Tensor], bigrams: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions' token ids (tensors [n, L], e.g. a split's per item) -> (the sorted keys they
    use [V]: their word ids, less special ones, and with ``bigrams`` the keys of the word
    pairs at least MIN_BIGRAM_CAPTIONS captions say; each key's inverse document frequency
    log(N / df) [V])."""
    tokens = list(tokens)
    rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in tokens]).long()
    if len(rows) == 0:
        raise ModelError("word prediction needs training captions; the split has none")
    # the captions' words, as masked language modeling's corpus vocabulary has them
    words = mlm_corpus_vocab(tokens).long()
    if len(words) == 0:
        raise ModelError("word prediction needs captions with words; these have none")
    # document frequency: each key counted once per caption (its first place in the sorted row)
    ordered = caption_keys(rows, bigrams).sort(dim=1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    keys, frequency = torch.unique(ordered[first], return_counts=True)
    keep = torch.isin(keys, words)
    if bigrams:
        low = (1 << BIGRAM_SHIFT) - 1
        keep |= (
            (keys > low)
            & torch.isin(keys >> BIGRAM_SHIFT, words)
            & torch.isin(keys & low, words)
            & (frequency >= MIN_BIGRAM_CAPTIONS)
        )
    idf = torch.log(len(rows) / frequency[keep].double()).float()
    return keys[keep], idf


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
        # what the vocabulary holds says whether captions are keyed with their pairs
        self.bigrams = bool((self.vocab >> BIGRAM_SHIFT).any())

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, D] (not normalised) -> word logits [B, V]."""
        return self.linear(INPUT_SCALE * F.normalize(image, dim=-1))

    def targets(self, tokens: torch.Tensor) -> torch.Tensor:
        """Captions [B, L] -> [B, V]: each caption's vocabulary words and pairs (once each,
        however often it says them), IDF-weighted and summing to 1; all zeros for a caption
        with none (a word or pair outside the vocabulary counts for nothing)."""
        keys = caption_keys(tokens, self.bigrams)
        positions = torch.searchsorted(self.vocab, keys).clamp(max=len(self.vocab) - 1)
        known = (self.vocab[positions] == keys).float()
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
