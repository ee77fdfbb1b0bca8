"""Scene queries: written from specs, checked against scenes, scored from rankings."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from model.config import TrainConfig
from model.data.synth import SynthConfig, generate_corpus, image_scenes
from model.data.synth.scenes import Relation, Scene, SceneObject
from model.factory import build_towers, model_config
from tests.captions import objects_in
from training.binding_check import binding_check
from training.eval_splits import evaluate_image_checks, evaluate_loaded, load_named_split
from training.scene_eval import scene_query_check
from training.scene_queries import SceneQuery, Wanted, satisfies, score, write_queries
from training.train import resolve_image_size
from training.training_data import CaptionedImages


def _obj(shape: str, colour: str, size: str, cell: tuple[int, int]) -> SceneObject:
    return SceneObject(shape, colour, size, cell, (0.5, 0.5))


# a large red circle on the left, a small blue star top right of it
TWO = Scene(
    (_obj("circle", "red", "large", (1, 0)), _obj("star", "blue", "small", (0, 2))),
    (Relation(0, "left of", 1),),
    "plain",
    (40, 40, 40),
)
ONE = Scene((_obj("heart", "white", "large", (1, 2)),), (), "plain", (40, 40, 40))


def test_a_scene_satisfies_a_query_only_when_every_constraint_holds() -> None:
    red_left = SceneQuery(
        "a large red circle on the left", "place", (Wanted("large", "red", "circle", (1, 0)),)
    )
    assert satisfies(TWO, red_left)
    assert not satisfies(ONE, red_left)
    wrong_size = SceneQuery("", "place", (Wanted("small", "red", "circle", (1, 0)),))
    wrong_cell = SceneQuery("", "place", (Wanted("large", "red", "circle", (1, 1)),))
    assert not satisfies(TWO, wrong_size)
    assert not satisfies(TWO, wrong_cell)
    star, circle = Wanted("small", "blue", "star"), Wanted("large", "red", "circle")
    assert satisfies(TWO, SceneQuery("", "relation", (star, circle), "above"))
    assert satisfies(TWO, SceneQuery("", "relation", (star, circle), "right of"))
    assert not satisfies(TWO, SceneQuery("", "relation", (star, circle), "below"))
    assert not satisfies(TWO, SceneQuery("", "relation", (circle, circle), "left of"))
    assert satisfies(ONE, SceneQuery("", "object", (Wanted("large", "white", "heart"),)))


def test_written_queries_are_distinct_and_each_is_satisfied_by_a_gallery_scene() -> None:
    scenes = [TWO, ONE] * 3
    queries = write_queries(scenes, n=10, seed=3)
    assert len({q.text for q in queries}) == len(queries) > 3
    assert all(any(satisfies(s, q) for s in scenes) for q in queries)
    assert write_queries(scenes, n=10, seed=3) == queries  # seeded


def test_score_counts_hits_at_one_and_five_against_the_oracle() -> None:
    heart = SceneQuery("a big white heart", "object", (Wanted("large", "white", "heart"),))
    absent = SceneQuery("a green cross", "object", (Wanted("small", "green", "cross"),))
    scenes = [TWO, ONE, TWO, TWO, TWO, TWO]
    ranked = np.array([[1, 0, 2, 3, 4], [0, 2, 3, 4, 5]])
    assert score([heart, absent], scenes, ranked) == {
        "scene_match@1": 50.0,
        "scene_match@5": 50.0,
        "scene_oracle": 50.0,
    }
    second = np.array([[0, 1, 2, 3, 4]])
    assert score([heart], scenes, second)["scene_match@1"] == 0.0
    assert score([heart], scenes, second)["scene_match@5"] == 100.0
    with pytest.raises(ValueError, match="no queries"):
        score([], scenes, ranked[:0])


def test_recomputed_scenes_are_the_ones_the_captions_describe(tmp_path: Path) -> None:
    config = SynthConfig(seed=4, n_images=60, n_videos=0, image_size=32)
    generate_corpus(tmp_path, config, workers=1)
    scenes = image_scenes(config)
    with (tmp_path / "images.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {int(r["image_id"][3:]) for r in rows} == set(range(60))
    for row in rows:
        split, scene = scenes[int(row["image_id"][3:])]
        assert split == row["split"]
        assert objects_in(row["caption"]) == {(o.size, o.colour, o.shape) for o in scene.objects}


def test_a_gallery_smaller_than_five_is_scored_on_what_it_ranks() -> None:
    heart = SceneQuery("a big white heart", "object", (Wanted("large", "white", "heart"),))
    assert score([heart], [TWO, ONE], np.array([[0, 1]]))["scene_match@5"] == 100.0


def test_the_image_checks_embed_the_split_once_and_equal_the_separate_checks(
    tmp_path: Path,
) -> None:
    """Training's final evaluation (and the demo's of the served towers) ranks the test images
    three times: recall, scene queries, binding. It embeds them once; the figures are the
    three checks' own."""
    generate_corpus(tmp_path, SynthConfig(seed=4, n_images=80, n_videos=0, image_size=32))
    config = resolve_image_size(
        TrainConfig.model_validate(
            {"model": "cots-micro", "data": {"train": str(tmp_path / "images.csv")}}
        )
    )
    towers = build_towers(config, pretrained=False).eval()
    context = int(model_config("cots-micro")["text_cfg"]["context_length"])
    split = load_named_split(config, "test", context)
    assert isinstance(split, CaptionedImages)
    assert len(split.records) >= 5
    cpu = torch.device("cpu")
    separate = evaluate_loaded(towers, config, split, cpu)
    checked = scene_query_check(towers, config, split, context, cpu)
    assert checked is not None
    separate.update(checked[0])
    separate.update(binding_check(towers, split, config.preprocess, context, cpu))
    assert {"scene_match@1", "binding_acc", "t2i_R@1"} <= separate.keys()

    embedded: list[int] = []
    encode_image = towers.encode_image

    def counting(images: torch.Tensor) -> torch.Tensor:
        embedded.append(len(images))
        return encode_image(images)

    towers.encode_image = counting  # type: ignore[method-assign]
    together = evaluate_image_checks(towers, config, split, context, cpu)
    assert together == separate
    # each test image and its fixed second view (the i2i queries), once each
    assert sum(embedded) == 2 * len(split.records)
