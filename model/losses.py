"""Contrastive and alignment losses on L2-normalised features.

Shapes: B queries, K keys, D feature dimension. Several captions of one image are positives of
each other: a key is a positive of a query when their group ids (image ids) are equal.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# Odd 61-bit multipliers for caption_ids: fixed, so ids agree across steps, ranks and resumes.
_CAPTION_HASH_SEED = 0x5EED_C0C5


@functools.cache
def _caption_hash_weights(length: int) -> torch.Tensor:
    # Drawn once per context length, not on every training step.
    generator = torch.Generator().manual_seed(_CAPTION_HASH_SEED)
    return torch.randint(1, 2**61, (length,), generator=generator) | 1


def caption_ids(tokens: torch.Tensor) -> torch.Tensor:
    """[B] long: one id per token row, equal exactly when the rows are (up to a negligible
    chance of collision): identical captions after the tokenizer's own cleaning."""
    weights = _caption_hash_weights(tokens.shape[-1]).to(tokens.device)
    return (tokens.long() * weights).sum(dim=-1)


def positive_mask(
    query_groups: torch.Tensor,
    key_groups: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    query_captions: torch.Tensor | None = None,
    key_captions: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, K] bool: keys of the query's group, or (when caption ids are given) of a pair whose
    caption is the query pair's caption; invalid keys never."""
    positives = query_groups[:, None] == key_groups[None, :]
    if query_captions is not None and key_captions is not None:
        positives |= query_captions[:, None] == key_captions[None, :]
    if key_valid is not None:
        positives &= key_valid[None, :]
    return positives


def multi_positive_targets(
    query_groups: torch.Tensor,
    key_groups: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    query_captions: torch.Tensor | None = None,
    key_captions: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B, K] target distribution: uniform over the query's positives (:func:`positive_mask`)."""
    positives = positive_mask(query_groups, key_groups, key_valid, query_captions, key_captions)
    counts = positives.sum(dim=1, keepdim=True).clamp(min=1)
    return positives.float() / counts


def distilled_targets(
    hard: torch.Tensor, teacher_logits: torch.Tensor, alpha: float
) -> torch.Tensor:
    """ALBEF's momentum distillation: (1 - alpha) * hard + alpha * softmax(teacher), per row
    (invalid keys at -inf in the teacher get no mass)."""
    if alpha <= 0:
        return hard
    return (1.0 - alpha) * hard + alpha * F.softmax(teacher_logits, dim=1)


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy) of the normalised singular values of [N, D] (Roy & Vetterli): D for
    features spread evenly over D directions, 1 for features on one line."""
    singular = torch.linalg.svdvals(features.float() - features.float().mean(dim=0))
    p = singular / singular.sum().clamp(min=1e-12)
    return float(torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum()))


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine over distinct pairs of rows of L2-normalised [N, D] features (a narrow cone
    of embeddings shows as a value near 1)."""
    n = len(features)
    if n < 2:
        return 1.0
    sims = features.float() @ features.float().t()
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


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
    image: torch.Tensor,
    text: torch.Tensor,
    groups: torch.Tensor,
    temperature: torch.Tensor,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    extra_i2t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CLIP baseline: InfoNCE both ways. Returns per-row (i2t, t2i) losses [B].

    ``batch``: (images, texts, groups) of the whole global batch, which this rank's rows score
    against (open_clip's ``ClipLoss`` with ``local_loss``: every rank's pairs are negatives);
    None: this batch alone. ``extra_i2t``: [B, N] logits of more texts that are negatives of
    every image (hard negative captions, :func:`with_negatives`)."""
    all_image, all_text, all_groups = batch if batch is not None else (image, text, groups)
    targets = multi_positive_targets(groups, all_groups)
    logits_i2t, targets_i2t = with_negatives(image @ all_text.t() / temperature, targets, extra_i2t)
    i2t = soft_cross_entropy(logits_i2t, targets_i2t)
    t2i = soft_cross_entropy(text @ all_image.t() / temperature, targets)
    return i2t, t2i


def with_negatives(
    logits: torch.Tensor, targets: torch.Tensor, negative_logits: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K + N] logits and targets: the N negative columns appended, with no target mass."""
    if negative_logits is None:
        return logits, targets
    return torch.cat([logits, negative_logits], dim=1), F.pad(targets, (0, len(negative_logits[0])))
