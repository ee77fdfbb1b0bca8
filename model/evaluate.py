"""Retrieval evaluation: Recall@1/5/10 both ways, mean recall and median rank.

Karpathy protocol with several captions per image: for text->image a caption's rank is that of
its image; for image->text an image's rank is that of its best-ranked caption. "Relevant" means
the same group id (image id), so duplicate images of one group count as one target.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.config import PreprocessConfig
from model.data.readers import load_image
from model.factory import Towers
from model.preprocess import to_tensor_batch
from model.training_data import CaptionedImages

KS = (1, 5, 10)


def _first_relevant_ranks(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_groups: torch.Tensor,
    key_groups: torch.Tensor,
    chunk: int = 1024,
) -> torch.Tensor:
    """0-based rank [Nq] of the best-scored relevant key per query.

    Ties count against the query (every irrelevant key scoring at least as high ranks first),
    so a collapsed model with equal scores everywhere gets no credit.
    """
    ranks = []
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ keys.t()  # [c, Nk]
        relevant = query_groups[start : start + chunk, None] == key_groups[None, :]
        best = scores.masked_fill(~relevant, float("-inf")).max(dim=1, keepdim=True).values
        ranks.append(((scores >= best) & ~relevant).sum(dim=1))
    return torch.cat(ranks)


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    image_groups: torch.Tensor,
    text_groups: torch.Tensor,
) -> dict[str, float]:
    """Metrics from L2-normalised embeddings; every text's group must have an image."""
    t2i = _first_relevant_ranks(text_emb, image_emb, text_groups, image_groups)
    i2t = _first_relevant_ranks(image_emb, text_emb, image_groups, text_groups)
    metrics: dict[str, float] = {}
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        for k in KS:
            metrics[f"{name}_R@{k}"] = 100.0 * float((ranks < k).float().mean())
        metrics[f"{name}_medr"] = float((ranks + 1).float().median())
    recalls = [metrics[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in KS]
    metrics["mean_recall"] = sum(recalls) / len(recalls)
    return metrics


@torch.no_grad()
def embed_split(
    towers: Towers,
    split: CaptionedImages,
    preprocess: PreprocessConfig,
    device: torch.device,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_emb [N, D], text_emb [M, D], image_groups [N], text_groups [M])."""
    was_training = towers.training
    towers.eval()
    image_emb = []
    for start in range(0, len(split.records), batch_size):
        records = split.records[start : start + batch_size]
        images = to_tensor_batch([load_image(r) for r in records], preprocess).to(device)
        image_emb.append(towers.encode_image(images).float().cpu())
    tokens = torch.cat(split.tokens)
    text_groups = torch.cat(
        [g.repeat(len(t)) for g, t in zip(split.groups, split.tokens, strict=True)]
    )
    text_emb = [
        towers.encode_text(tokens[s : s + batch_size].to(device)).float().cpu()
        for s in range(0, len(tokens), batch_size)
    ]
    towers.train(was_training)
    return torch.cat(image_emb), torch.cat(text_emb), split.groups, text_groups


def evaluate(
    towers: Towers, split: CaptionedImages, preprocess: PreprocessConfig, device: torch.device
) -> dict[str, float]:
    return retrieval_metrics(*embed_split(towers, split, preprocess, device))


def format_metrics(name: str, metrics: dict[str, float], keys: Sequence[str] | None = None) -> str:
    keys = keys or [
        "t2i_R@1",
        "t2i_R@5",
        "t2i_R@10",
        "i2t_R@1",
        "i2t_R@5",
        "i2t_R@10",
        "mean_recall",
    ]
    return f"{name}: " + "  ".join(f"{k} {metrics[k]:.1f}" for k in keys)
