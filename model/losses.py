"""Contrastive and alignment losses on L2-normalised features.

Shapes: B queries, K keys, D feature dimension. Several captions of one image are positives of
each other: a key is a positive of a query when their group ids (image ids) are equal.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def multi_positive_targets(
    query_groups: torch.Tensor, key_groups: torch.Tensor, key_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """[B, K] target distribution: uniform over the keys that share the query's group."""
    positives = query_groups[:, None] == key_groups[None, :]
    if key_valid is not None:
        positives &= key_valid[None, :]
    counts = positives.sum(dim=1, keepdim=True).clamp(min=1)
    return positives.float() / counts


def masked_logits(
    query: torch.Tensor,
    keys: torch.Tensor,
    temperature: torch.Tensor,
    key_valid: torch.Tensor | None,
) -> torch.Tensor:
    """[B, K] similarities / temperature, with invalid keys at -inf."""
    logits = query @ keys.t() / temperature
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid[None, :], float("-inf"))
    return logits


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy [B] against target distributions; -inf logits with 0 target are ok."""
    log_probs = F.log_softmax(logits, dim=1)
    return -(targets * log_probs.masked_fill(targets == 0, 0.0)).sum(dim=1)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p||q) + KL(q||p) [B] between softmax(logits_a) and softmax(logits_b).

    Columns at -inf in both (invalid keys) have probability 0 and contribute nothing.
    """
    log_p, log_q = F.log_softmax(logits_a, dim=1), F.log_softmax(logits_b, dim=1)
    p, q = log_p.exp(), log_q.exp()
    both_invalid = torch.isinf(log_p) & torch.isinf(log_q)
    diff = (log_p - log_q).masked_fill(both_invalid, 0.0)
    return ((p - q) * diff).sum(dim=1)


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, groups: torch.Tensor, temperature: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP baseline: in-batch InfoNCE both ways. Returns per-row (i2t, t2i) losses [B]."""
    targets = multi_positive_targets(groups, groups)
    logits = image @ text.t() / temperature
    return soft_cross_entropy(logits, targets), soft_cross_entropy(logits.t(), targets)
