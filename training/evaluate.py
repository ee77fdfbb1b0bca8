"""Retrieval evaluation: Recall@1/5/10 both ways, mean recall and median rank.

Karpathy protocol with several captions per image: for text->image a caption's rank is that of
its image; for image->text an image's rank is that of its best-ranked caption. "Relevant" means
the same group id (image id), so duplicate images of one group count as one target.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Protocol

import torch

from model.aux_inputs import augment_view
from model.config import IntraModalConfig, PreprocessConfig
from model.data.readers import load_image
from model.factory import Towers
from model.preprocess import normalise_pixels, to_tensor_batch
from training.training_data import CaptionedImages

KS = (1, 5, 10)
EVAL_VIEW = IntraModalConfig()  # i2i queries: the training default second view


class CaptionEncoder(Protocol):
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


def _first_relevant_ranks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_groups: torch.Tensor,
    key_groups: torch.Tensor,
    chunk: int = 1024,
    exclude_self: bool = False,
) -> torch.Tensor:
    """0-based rank [Nq] of the best-scored relevant key per query.

    Ties count against the query (every irrelevant key scoring at least as high ranks first),
    so a collapsed model with equal scores everywhere gets no credit. With ``exclude_self``
    (queries and keys are the same items), query i never retrieves key i.
    """
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ keys.t()  # [c, Nk]
        relevant = query_groups[start : start + chunk, None] == key_groups[None, :]
        if exclude_self:
            rows = torch.arange(len(scores))
            scores[rows, rows + start] = float("-inf")
            relevant[rows, rows + start] = False
        best = scores.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append(((scores >= best) & ~relevant).sum(dim=1))
    return torch.cat(ranks)


def _recalls(name: str, ranks: torch.Tensor) -> dict[str, float]:
    metrics = {f"{name}_R@{k}": 100.0 * float((ranks < k).float().mean()) for k in KS}
    metrics[f"{name}_medr"] = float((ranks + 1).float().median())
    return metrics


def intra_modal_metrics(
    image_emb: torch.Tensor,
    image_view_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_groups: torch.Tensor,
    text_groups: torch.Tensor,
) -> dict[str, float]:
    """Image->image and text->text retrieval, relevant = same group (image id).

    t2t: each caption queries all other captions; captions whose image has no other caption
    are not queries. i2i: each image is one image per id in our corpora, so the queries are a
    second view of each image (shifted and re-lit as in training) against the clean images.
    """
    i2i = _first_relevant_ranks(image_view_emb, image_emb, image_groups, image_groups)
    metrics = _recalls("i2i", i2i)
    has_pair = (text_groups[:, None] == text_groups[None, :]).sum(dim=1) > 1
    if bool(has_pair.any()):
        t2t = _first_relevant_ranks(
            text_emb, text_emb, text_groups, text_groups, exclude_self=True
        )[has_pair]
        metrics.update(_recalls("t2t", t2t))
    return metrics


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_groups: torch.Tensor,
    text_groups: torch.Tensor,
    directions: tuple[str, str] = ("t2i", "i2t"),
) -> dict[str, float]:
    """Metrics from L2-normalised embeddings; every text's group must have an image (or
    video: pass ``directions=("t2v", "v2t")`` to name the keys so)."""
    text_to, to_text = directions
    t2i = _first_relevant_ranks(text_emb, image_emb, text_groups, image_groups)
    i2t = _first_relevant_ranks(image_emb, text_emb, image_groups, text_groups)
    metrics = {**_recalls(text_to, t2i), **_recalls(to_text, i2t)}
    recalls = [metrics[f"{d}_R@{k}"] for d in directions for k in KS]
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    return metrics


@torch.no_grad()
def embed_split(
    towers: Towers,
    split: CaptionedImages,
    preprocess: PreprocessConfig,
    device: torch.device,
    batch_size: int = 256,
    views: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_emb [N, D], text_emb [M, D], image_groups [N], text_groups [M]).

    With ``views`` (a list), the embeddings of a fixed second view of each image are appended.
    """
    was_training = towers.training
    towers.eval()
    image_emb = []
    generator = torch.Generator().manual_seed(0)
    for start in range(0, len(split.records), batch_size):
        images = split_images(split, start, start + batch_size, preprocess).to(device)
        image_emb.append(towers.encode_image(images).float().cpu())
        if views is not None:
            second = augment_view(images, EVAL_VIEW.max_shift, EVAL_VIEW.brightness, generator)
            views.append(towers.encode_image(second).float().cpu())
    text_emb, text_groups = embed_captions(towers, split.tokens, split.groups, device, batch_size)
    towers.train(was_training)
    return torch.cat(image_emb), text_emb, split.groups, text_groups


def split_images(
    split: CaptionedImages, start: int, stop: int, preprocess: PreprocessConfig
) -> torch.Tensor:
    """Normalised images [start:stop] of a split: from its pixel cache when it has one."""
    if split.pixels is not None:
        return normalise_pixels(split.pixels[start:stop], preprocess)
    return to_tensor_batch([load_image(r) for r in split.records[start:stop]], preprocess)


def caption_groups(groups: torch.Tensor, captions: Sequence[Sized]) -> torch.Tensor:
    """[M] the group id of every caption, in item order, from one id per item and each item's
    captions (token rows or strings)."""
    return torch.cat([g.repeat(len(c)) for g, c in zip(groups, captions, strict=True)])


@torch.no_grad()
def embed_captions(
    towers: CaptionEncoder,
    tokens: Sequence[torch.Tensor],
    groups: torch.Tensor,
    device: torch.device,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text_emb [M, D], text_groups [M]) of every caption of every item, in item order;
    ``tokens`` holds one [n_captions, L] tensor per item, ``groups`` one id per item."""
    flat = torch.cat(list(tokens))
    text_groups = caption_groups(groups, tokens)
    text_emb = [
        towers.encode_text(flat[s : s + batch_size].to(device)).float().cpu()
        for s in range(0, len(flat), batch_size)
    ]
    return torch.cat(text_emb), text_groups


def evaluate(
    towers: Towers,
    split: CaptionedImages,
    preprocess: PreprocessConfig,
    device: torch.device,
    intra: bool = True,
) -> dict[str, float]:
    """Cross-modal metrics, plus image->image and text->text ones with ``intra``."""
    return evaluate_and_embed(towers, split, preprocess, device, intra)[0]


def evaluate_and_embed(
    towers: Towers,
    split: CaptionedImages,
    preprocess: PreprocessConfig,
    device: torch.device,
    intra: bool = True,
) -> tuple[dict[str, float], torch.Tensor]:
    """:func:`evaluate`'s metrics and the split's image embeddings [N, D], which the checks
    that rank the same images (scene queries, binding) reuse instead of embedding again."""
    views: list[torch.Tensor] | None = [] if intra else None
    image_emb, text_emb, image_groups, text_groups = embed_split(
        towers, split, preprocess, device, views=views
    )
    metrics = retrieval_metrics(image_emb, text_emb, image_groups, text_groups)
    if views:
        metrics.update(
            intra_modal_metrics(image_emb, torch.cat(views), text_emb, image_groups, text_groups)
        )
    return metrics, image_emb


def format_metrics(name: str, metrics: dict[str, float], keys: Sequence[str] | None = None) -> str:
    """One line: R@1/5/10 both ways (t2i/i2t or t2v/v2t), mean recall, i2i/t2t R@1 if present."""
    if keys is None:
        directions = ("t2v", "v2t") if "t2v_R@1" in metrics else ("t2i", "i2t")
        keys = [f"{d}_R@{k}" for d in directions for k in KS] + ["mean_recall"]
        optional = ["i2i_R@1", "t2t_R@1", "scene_match@1", "scene_match@5", "binding_acc"]
        optional += ["time_order_acc", "direction_acc"]
        keys += [k for k in optional if k in metrics]
    return f"{name}: " + "  ".join(f"{k} {metrics[k]:.1f}" for k in keys)
