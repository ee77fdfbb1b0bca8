"""The scene-query check on trained towers: queries written from the test scenes, searched over
the split's images, scored by whether the hits' scenes satisfy them.

Data flow: the corpus's ``dataset.json`` gives the synthetic config, from which
:func:`corpus_scenes` recomputes every image's scene (keyed by image id); the split's images
are embedded as in evaluation, the queries (``training.scene_queries``) are tokenised and
embedded by the text tower, ranked by cosine, and scored. Corpora that are not synthetic have
no scene specs: the check returns None for them.

:func:`collection_scene_check` asks the demo's question instead: the same queries (written from
the test scenes), searched over every image of the corpus, all splits together, as the demo's
``images`` collection holds them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.config import TrainConfig
from model.data.synth.scenes import Scene
from model.factory import Towers
from model.tokenizer import tokenize
from training.evaluate import embed_split
from training.scene_queries import SceneQuery, corpus_scenes, score, write_queries
from training.training_data import CaptionedImages, load_split


def split_scenes(split: CaptionedImages, corpus: Path) -> list[Scene] | None:
    """The scene of every image of ``split``, in its order; None without scene specs."""
    scenes = corpus_scenes(corpus)
    if scenes is None:
        return None
    try:
        return [scenes[record.group_id] for record in split.records]
    except KeyError:
        return None  # a CSV that is not the one dataset.json describes


def split_queries(
    scenes: dict[str, Scene], gallery: CaptionedImages, split: str | None, n_queries: int = 200
) -> list[SceneQuery]:
    """Queries written from the scenes of the ``split`` images of a gallery that holds every
    split (in corpus order, as the demo writes them); KeyError for an image without a scene."""
    ids = dict.fromkeys(record.group_id for record in gallery.records if record.split == split)
    return write_queries([scenes[i] for i in ids], n_queries)


def _top5(
    towers: Towers,
    config: TrainConfig,
    split: CaptionedImages,
    queries: list[SceneQuery],
    context_length: int,
    device: torch.device,
    image_emb: torch.Tensor | None = None,
) -> np.ndarray:
    """[Q, <=5] indices of the split's images each query ranks first (a split smaller than
    five images ranks all of them); ``image_emb``: the split's image embeddings when the caller
    has them already."""
    if image_emb is None:
        image_emb = embed_split(towers, split, config.preprocess, device)[0]
    was_training = towers.training
    towers.eval()
    tokens = tokenize([q.text for q in queries], context_length).to(device)
    text_emb = towers.encode_text(tokens).float().cpu()
    towers.train(was_training)
    return (text_emb @ image_emb.T).topk(min(5, len(image_emb)), dim=1).indices.numpy()


@torch.no_grad()
def scene_query_check(
    towers: Towers,
    config: TrainConfig,
    split: CaptionedImages,
    context_length: int,
    device: torch.device,
    n_queries: int = 200,
    image_emb: torch.Tensor | None = None,
) -> tuple[dict[str, float], list[tuple[SceneQuery, list[int]]]] | None:
    """(scene_match@1/@5 and the oracle in %, each query with its top-5 split indices), or
    None when the corpus has no scene specs; ``image_emb`` as :func:`_top5` takes it."""
    scenes = split_scenes(split, Path(config.data.train).parent)
    if scenes is None:
        return None
    queries = write_queries(scenes, n_queries)
    ranked = _top5(towers, config, split, queries, context_length, device, image_emb)
    ranked_lists = [list(map(int, row)) for row in np.asarray(ranked)]
    return score(queries, scenes, ranked), list(zip(queries, ranked_lists, strict=True))


@torch.no_grad()
def collection_scene_check(
    towers: Towers,
    config: TrainConfig,
    context_length: int,
    device: torch.device,
    n_queries: int = 200,
) -> dict[str, float] | None:
    """Scene match over the whole corpus (``collection_scene_match@1/@5``, in %): queries from
    the test scenes, as the demo writes them, ranked over all images of every split; None for
    a corpus without scene specs."""
    corpus = Path(config.data.train).parent
    scenes = corpus_scenes(corpus)
    if scenes is None:
        return None
    everything = load_split(config.data, None, context_length, preprocess=config.preprocess)
    try:
        gallery = [scenes[record.group_id] for record in everything.records]
        queries = split_queries(scenes, everything, "test", n_queries)
    except KeyError:
        return None
    ranked = _top5(towers, config, everything, queries, context_length, device)
    scored = score(queries, gallery, ranked)
    return {
        "collection_scene_match@1": scored["scene_match@1"],
        "collection_scene_match@5": scored["scene_match@5"],
        "collection_images": float(len(gallery)),
    }
