"""The binding check, in the spirit of ARO (Yuksekgonul et al., ICLR 2023): does an image score
its own caption above the same caption with one attribute or relation swapped?

Data flow: each image of the split keeps its first caption; :func:`model.hard_negatives.
hard_negatives` writes that caption's swaps, and a generator seeded per image picks one of each
kind it has (colour, shape, size, position, relation, binding). The images are embedded as in
evaluation, the captions and their negatives by the text tower; a pair counts when the true
caption's cosine with the image is strictly higher. Reported in %: ``binding_acc`` over every
pair, ``binding_acc_<kind>`` per kind, and ``binding_coverage``, the share of images whose
caption had anything to swap (a real corpus's captions may have little). Chance is 50 %.
Nothing here reads scene specs, so it runs on any corpus.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.config import NEGATIVE_KINDS, PreprocessConfig
from model.factory import Towers
from model.hard_negatives import Negative, hard_negatives
from model.tokenizer import tokenize
from training.evaluate import embed_split
from training.training_data import CaptionedImages


def binding_pairs(captions: list[str], seed: int = 0) -> list[tuple[int, str, Negative]]:
    """(item index, caption, one negative) for each kind each caption has, picked by a
    generator seeded by (seed, item), so a split's pairs never change between runs."""
    pairs = []
    for index, caption in enumerate(captions):
        by_kind: dict[str, list[Negative]] = {}
        for negative in hard_negatives(caption):
            by_kind.setdefault(negative.kind, []).append(negative)
        rng = np.random.default_rng([seed, index])
        for kind in NEGATIVE_KINDS:
            options = by_kind.get(kind)
            if options:
                pairs.append((index, caption, options[int(rng.integers(len(options)))]))
    return pairs


@torch.no_grad()
def binding_check(
    towers: Towers,
    split: CaptionedImages,
    preprocess: PreprocessConfig,
    context_length: int,
    device: torch.device,
    image_emb: torch.Tensor | None = None,
) -> dict[str, float]:
    """Binding accuracies in % (see the module docstring); ``image_emb``: the split's image
    embeddings when the caller has them already."""
    if image_emb is None:
        image_emb = embed_split(towers, split, preprocess, device)[0]
    pairs = binding_pairs([captions[0] for captions in split.captions])
    if not pairs:
        return {"binding_coverage": 0.0}
    was_training = towers.training
    towers.eval()
    texts = [text for _, caption, negative in pairs for text in (caption, negative.text)]
    embedded = []
    for start in range(0, len(texts), 512):
        tokens = tokenize(texts[start : start + 512], context_length).to(device)
        embedded.append(F.normalize(towers.encode_text(tokens).float(), dim=-1).cpu())
    towers.train(was_training)
    text_emb = torch.cat(embedded).view(len(pairs), 2, -1)
    images = F.normalize(image_emb.float(), dim=-1)[torch.tensor([p[0] for p in pairs])]
    scores = torch.einsum("nd,ncd->nc", images, text_emb)
    correct = (scores[:, 0] > scores[:, 1]).float()
    kinds = np.array([negative.kind for _, _, negative in pairs])
    metrics = {
        "binding_acc": 100.0 * float(correct.mean()),
        "binding_coverage": 100.0 * len({p[0] for p in pairs}) / len(split.captions),
    }
    for kind in NEGATIVE_KINDS:
        chosen = torch.from_numpy(kinds == kind)
        if bool(chosen.any()):
            metrics[f"binding_acc_{kind}"] = 100.0 * float(correct[chosen].mean())
    return metrics
