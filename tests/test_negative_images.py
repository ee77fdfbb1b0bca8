"""Hard negative images (``objective.hard_negatives.image_share``): which images are twins,
on hand-written captions; how batches take them in; and that a run with them resumes exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from model.config import HardNegativeConfig
from tests.test_training import _assert_resume_is_exact, micro, train_losses
from training.negative_images import negative_image_twins, twin_coverage, word_key
from training.train import train
from training.training_data import CaptionNegatives, EpochBatches

CAPTIONS = [
    ["a small purple square on the right"],  # 0
    ["on the right, a small purple circle", "a tiny purple circle at the right side"],  # 1
    ["a small purple square on the left"],  # 2: the place differs from 0
    ["a dog asleep on a sofa"],  # 3: nothing to swap, nobody's twin
    ["a small green square on the right"],  # 4: the colour differs from 0
    ["a big red car beside a small blue bus", "a small blue bus beside a big red car"],  # 5
]


def test_word_keys_ignore_order_case_and_punctuation() -> None:
    assert word_key("On the right, a small purple circle") == word_key(
        "a small purple circle on the right"
    )
    assert word_key("a small purple circle") != word_key("a small purple square")


def test_images_whose_captions_are_each_others_negatives_are_twins() -> None:
    every_kind = negative_image_twins(CAPTIONS, CaptionNegatives(HardNegativeConfig()))
    assert every_kind[0] == [1, 2, 4]  # shape, place and colour
    assert every_kind[1] == [0]
    assert every_kind[2] == [0]
    assert every_kind[4] == [0]
    assert every_kind[3] == []
    assert every_kind[5] == []  # its negatives describe no other image
    shape_only = negative_image_twins(
        CAPTIONS, CaptionNegatives(HardNegativeConfig(kinds=["shape"]))
    )
    assert shape_only[0] == [1]
    assert shape_only[2] == shape_only[4] == []
    assert twin_coverage(every_kind) == pytest.approx(4 / 6)
    assert twin_coverage([]) == 0.0


def _batches(sampler: EpochBatches, epoch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return [[key[0] for key in batch] for batch in sampler]


def test_batches_put_a_twin_beside_its_item_and_stay_seeded() -> None:
    n = 64
    # Items 0..31 have one twin each (32..63); the others none.
    twins = [[i + 32] for i in range(32)] + [[] for _ in range(32)]
    plain = EpochBatches([1] * n, 16, seed=3)
    paired = EpochBatches([1] * n, 16, seed=3, twins=twins, twin_share=0.25)
    again = EpochBatches([1] * n, 16, seed=3, twins=twins, twin_share=0.25)
    for epoch in (0, 1):
        before, after = _batches(plain, epoch), _batches(paired, epoch)
        assert after == _batches(again, epoch)
        for old, new in zip(before, after, strict=True):
            assert len(new) == 16
            assert len(set(new)) == 16
            assert new[:12] == old[:12]  # the batch's first items are what they were
            wanted = [i + 32 for i in old[:12] if i < 32 and i + 32 not in old][:4]
            assert new[12 : 12 + len(wanted)] == wanted
            assert new[12 + len(wanted) :] == old[12 : 16 - len(wanted)]
    # twin_share 0 (or no twins) leaves the batches as they were
    assert _batches(EpochBatches([1] * n, 16, seed=3, twins=twins)) == _batches(plain)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 drawn images, one shape each: 2 colours x 2 shapes x 2 places x 12 copies, each
    captioned plainly, so every image has twins (its caption with one word swapped is
    another's)."""
    root = tmp_path_factory.mktemp("negative-images-corpus")
    rows = []
    fills = {"red": (222, 38, 38), "blue": (44, 90, 230)}
    for copy in range(12):
        for colour, fill in fills.items():
            for shape in ("circle", "square"):
                for place, left in (("left", 3), ("right", 17)):
                    name = f"{copy}-{colour}-{shape}-{place}.png"
                    image = Image.new("RGB", (32, 32), (40 + copy, 40, 40))
                    box = (left, 10, left + 11, 21)
                    draw = ImageDraw.Draw(image)
                    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=fill)
                    image.save(root / name)
                    rows.append(
                        {
                            "filepath": name,
                            "caption": f"a small {colour} {shape} on the {place}",
                            "image_id": name,
                            "split": "train" if copy < 10 else "test",
                        }
                    )
    path = root / "captions.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "caption", "image_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_run_with_hard_negative_images_resumes_exactly_and_differs_from_one_without(
    corpus: Path, tmp_path: Path
) -> None:
    data: dict[str, Any] = {"val_split": None, "eval_splits": []}
    negatives = {"hard_negatives": {"enabled": True, "image_share": 0.25}}
    _assert_resume_is_exact(corpus, tmp_path, objective=negatives, data=data, epochs=4)
    without = micro(
        corpus,
        tmp_path / "without",
        objective={"hard_negatives": {"enabled": True}},
        data=data,
        epochs=4,
    )
    train(without, progress=False)
    assert train_losses(tmp_path / "without") != train_losses(tmp_path / "straight")


def test_hard_negative_images_without_negative_captions(corpus: Path, tmp_path: Path) -> None:
    """``fraction`` 0: no caption goes through the text tower twice, and the negatives still
    find the images that batches take in."""
    data: dict[str, Any] = {"val_split": None, "eval_splits": []}

    def run(name: str, image_share: float) -> dict[int, float]:
        negatives = {"enabled": True, "fraction": 0.0, "image_share": image_share}
        config = micro(
            corpus, tmp_path / name, objective={"hard_negatives": negatives}, data=data, epochs=1
        )
        train(config, progress=False)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        assert not any(r.get("hard_negatives") for r in rows)
        return train_losses(tmp_path / name)

    assert run("twins", 0.25) != run("plain", 0.0)
