"""Per-step inputs of the auxiliary objectives: masked captions, patch masks, second views.

Built outside the model from a generator seeded by (seed, step), so a resumed run masks and
augments exactly as the uninterrupted run would have.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.clip_tokens import SPECIAL_IDS
from model.config import ObjectiveConfig
from model.factory import CLIP_VOCAB, MASK_TOKEN_ID
from model.masking import block_masks, mask_text_tokens

SPECIAL_TEXT_IDS = SPECIAL_IDS  # never masked: padding, start and end of text


@dataclass
class AuxInputs:
    masked_tokens: torch.Tensor | None = None  # [B, L] captions with [MASK]s
    mlm_labels: torch.Tensor | None = None  # [B, L] original ids where masked, else ignored
    patch_mask: torch.Tensor | None = None  # [B, P] True = patch masked
    second_view: torch.Tensor | None = None  # [B, 3, S, S] augmented copy of the images
    time_order: bool = False  # also embed each clip played backwards
    negative_tokens: torch.Tensor | None = None  # [N, L] hard negative captions of some rows
    negative_rows: torch.Tensor | None = None  # [N] long: the batch row each negative is of


def augment_view(
    images: torch.Tensor, max_shift: int, brightness: float, generator: torch.Generator
) -> torch.Tensor:
    """A second view: each image shifted by up to ``max_shift`` pixels (edges replicated) and
    brightened or darkened a little. No flips or crops: the captions name left/right and
    positions, which must stay true of both views."""
    b, _, h, w = images.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator)
    offsets = torch.empty(b, 1, 1, 1).uniform_(-brightness, brightness, generator=generator)
    if max_shift > 0:
        padded = F.pad(images, (max_shift,) * 4, mode="replicate")
        views = []
        for i, (dy, dx) in enumerate(shifts.tolist()):
            top, left = max_shift + dy, max_shift + dx
            views.append(padded[i, :, top : top + h, left : left + w])
        images = torch.stack(views)
    return images + offsets.to(images.device, images.dtype)


def mlm_corpus_vocab(tokens: Iterable[torch.Tensor]) -> torch.Tensor:
    """The MLM head's corpus vocabulary (``masked.mlm_vocab: corpus``): the sorted ids the
    captions ``tokens`` (e.g. a training split's per-item [n_captions, L]) use, less padding,
    start, end and [MASK]. Those are never labels, so every masked training word is in it."""
    used = torch.unique(torch.cat([t.reshape(-1) for t in tokens]))
    excluded = torch.tensor([*SPECIAL_TEXT_IDS, MASK_TOKEN_ID], dtype=used.dtype)
    return used[~torch.isin(used, excluded)]


def make_aux_inputs(
    config: ObjectiveConfig,
    images: torch.Tensor,
    tokens: torch.Tensor,
    patch_grid: tuple[int, int] | None,
    generator: torch.Generator,
    *,
    mlm_vocab: torch.Tensor | None = None,
    negatives: torch.Tensor | None = None,
) -> AuxInputs | None:
    """What the enabled auxiliary objectives need for this batch; None when none is on.
    ``mlm_vocab``: the MLM head's corpus vocabulary, which masking's random tokens come from
    (None: the full vocabulary). ``negatives``: [B, L] each row's hard negative caption, all
    zeros where it has none."""
    aux = AuxInputs()
    if negatives is not None:
        rows = negatives.any(dim=1).nonzero()[:, 0]
        if len(rows):
            aux.negative_tokens, aux.negative_rows = negatives[rows], rows
    masked = config.masked
    if masked.mlm_weight > 0:
        masked_tokens, labels = mask_text_tokens(
            tokens.cpu(),
            mask_token_id=MASK_TOKEN_ID,
            vocab_size=CLIP_VOCAB,
            special_ids=SPECIAL_TEXT_IDS,
            generator=generator,
            mask_prob=masked.text_mask_prob,
            replacement_ids=None if mlm_vocab is None else mlm_vocab.cpu(),
        )
        aux.masked_tokens = masked_tokens.to(tokens.device)
        aux.mlm_labels = labels.to(tokens.device)
    if masked.mvm_weight > 0 and images.ndim == 4:
        if patch_grid is None:
            raise ValueError("masked vision modeling needs the image tower's patch grid")
        patch_mask = block_masks(
            len(images), patch_grid, masked.patch_mask_ratio, generator=generator
        )
        aux.patch_mask = patch_mask.to(images.device)
    if config.intra.weight > 0 and images.ndim == 4:
        aux.second_view = augment_view(
            images, config.intra.max_shift, config.intra.brightness, generator
        )
    aux.time_order = config.time_order_weight > 0 and images.ndim == 5
    empty = all(
        v is None for v in (aux.masked_tokens, aux.patch_mask, aux.second_view, aux.negative_tokens)
    )
    return None if empty and not aux.time_order else aux
