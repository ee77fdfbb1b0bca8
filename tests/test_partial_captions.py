"""Partial captions (model/partial_captions.py): hand-written captions, the synthetic corpus's
captions checked against their scenes, captions that are not the generator's, and a training
run that uses them (resumed equals uninterrupted; only the training split gets them)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from model.config import TrainConfig
from model.partial_captions import partial_caption, partial_coverage, with_partial_captions
from tests.captions import objects_in
from tests.test_training import _assert_resume_is_exact
from training.training_data import load_split


@pytest.mark.parametrize(
    ("caption", "partial"),
    [
        (
            "a red star above a blue square, and a green circle left of the blue square",
            "a red star above a blue square",
        ),
        (
            "a big red ring with a small cross over it and a blue heart under it",
            "a big red ring with a small cross over it",
        ),
        (
            "a red star above a blue square and a green ring under it, on a striped background",
            "a red star above a blue square, on a striped background",
        ),
        # not the generator's words: a photo caption joined by "and" and by ";"
        ("a man riding a horse and a dog running beside it", "a man riding a horse"),
        ("two dogs play in the snow; a child watches them", "two dogs play in the snow"),
        (
            "A woman holds an umbrella, and the rain falls, in a park",
            "A woman holds an umbrella, in a park",
        ),
    ],
)
def test_a_caption_is_cut_after_its_first_conjunct(caption: str, partial: str) -> None:
    assert partial_caption(caption) == partial


@pytest.mark.parametrize(
    "caption",
    [
        "a large blue star over a purple heart that is big",  # one clause: nothing to drop
        "a red and white striped shirt on a bed",  # "and" joins adjectives, not clauses
        "three objects: a red star, a blue square and a green circle",  # a count would lie
        "cats and dogs",  # no determiner after the conjunction
        # the head would name one thing, true of many images of a batch
        "a red star and a blue square; the red star is above the blue square",
        "",
        "and a dog",  # nothing before the conjunction
    ],
)
def test_a_caption_that_cannot_be_cut_yields_none(caption: str) -> None:
    assert partial_caption(caption) is None


def test_coverage_is_the_share_of_captions_that_can_be_cut() -> None:
    captions = ["a star by a ring and a cat", "a red star", "a cat on a mat; a dog", "a and b"]
    assert partial_coverage(captions) == 0.5
    assert partial_coverage([]) == 0.0


def test_partial_captions_are_added_once_up_to_the_limit() -> None:
    captions = [
        "a red star over a ring and a blue square",
        "a red star over a ring, and a green circle",  # the same head: added once
        "a cat on a mat; a dog on a rug",
    ]
    assert with_partial_captions(captions, 0) == captions
    assert with_partial_captions(captions, 1) == [*captions, "a red star over a ring"]
    assert with_partial_captions(captions, 5) == [
        *captions,
        "a red star over a ring",
        "a cat on a mat",
    ]
    # a head the item already has as a caption is not added again
    assert with_partial_captions(["a cat on a mat", "a cat on a mat and a dog"], 2) == [
        "a cat on a mat",
        "a cat on a mat and a dog",
    ]


@pytest.fixture
def corpus(synth_images_200: Path) -> Path:
    return synth_images_200


def test_every_partial_synthetic_caption_names_a_subset_of_its_objects(corpus: Path) -> None:
    """A partial caption names fewer objects than its caption, and only objects the caption
    names, so it stays true of the image (the generator's captions are true of their scenes)."""
    with corpus.open(newline="") as file:
        captions = [row["caption"] for row in csv.DictReader(file)]
    cut = 0
    for caption in captions:
        partial = partial_caption(caption)
        if partial is None:
            continue
        cut += 1
        assert len(objects_in(partial)) == 2, (caption, partial)
        assert objects_in(partial) < objects_in(caption), (caption, partial)
    # the three-object captions that open with a two-object clause (about a quarter of all)
    assert 0.1 < cut / len(captions) == partial_coverage(captions) < 0.5


def test_only_the_training_split_gets_partial_captions(corpus: Path) -> None:
    data = TrainConfig.model_validate({"data": {"train": str(corpus)}}).data
    plain = load_split(data, "train", 32)
    more = load_split(data, "train", 32, partial_captions=1)
    added = 0
    for before, after, tokens in zip(plain.captions, more.captions, more.tokens, strict=True):
        assert after[: len(before)] == before
        assert len(after) - len(before) <= 1
        assert tokens.shape[0] == len(after)
        added += len(after) - len(before)
    assert added > len(plain.captions) // 10
    # evaluation reads splits without the argument: their captions are the corpus's
    test = load_split(data, "test", 32)
    assert test.captions == [list(record.captions) for record in test.records]


def test_a_video_config_with_partial_captions_is_refused() -> None:
    with pytest.raises(ValueError, match="partial_captions applies to image corpora"):
        TrainConfig.model_validate({"data": {"modality": "video", "partial_captions": 1}})


def test_a_resumed_run_with_partial_captions_equals_the_uninterrupted_one(
    corpus: Path, tmp_path: Path
) -> None:
    _assert_resume_is_exact(corpus, tmp_path, data={"train": str(corpus), "partial_captions": 1})
