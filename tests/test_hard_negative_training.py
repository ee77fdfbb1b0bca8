"""Training with hard negative captions, and a text tower that learns only new words.

Real training runs of cots-micro: a resumed run with hard negatives equals the uninterrupted
one step by step (both objectives); the transform runs on a corpus whose captions are not the
synthetic generator's; and ``learn_new_words`` leaves every seen word's embedding, and so the
embedding of any text made of seen words, bit for bit as it was.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from model.config import TrainConfig
from model.data.synth import SynthConfig, generate_corpus
from model.hard_negatives import coverage
from model.tokenizer import tokenize
from tests.test_training import _assert_resume_is_exact, micro, train_losses, trained_towers
from training.train import train
from training.training_data import EpochBatches, colour_keys

NEGATIVES: dict[str, Any] = {"hard_negatives": {"enabled": True}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("negatives-corpus") / "corpus"
    generate_corpus(out, SynthConfig(seed=1, n_images=200, n_videos=0, image_size=32), workers=2)
    return out / "images.csv"


def _metrics(output: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def test_a_resumed_cots_run_with_hard_negatives_equals_the_uninterrupted_one(
    corpus: Path, tmp_path: Path
) -> None:
    negatives = {"hard_negatives": {"enabled": True, "similar_share": 0.5}}
    _assert_resume_is_exact(corpus, tmp_path, objective=negatives)
    rows = [r for r in _metrics(tmp_path / "straight") if "hard_negatives" in r]
    assert rows
    # nearly every synthetic caption has something to swap: the batch of 16 brings 16
    assert all(r["hard_negatives"] >= 14 for r in rows)
    assert all(0.0 <= r["hard_negative_accuracy"] <= 1.0 for r in rows)


def test_a_resumed_clip_run_with_hard_negatives_equals_the_uninterrupted_one(
    corpus: Path, tmp_path: Path
) -> None:
    objective = {**NEGATIVES, "kind": "clip", "queue_size": 0}
    data: dict[str, Any] = {"val_split": None, "eval_splits": []}
    straight = micro(corpus, tmp_path / "straight", objective=objective, data=data)
    interrupted = micro(corpus, tmp_path / "interrupted", objective=objective, data=data)
    train(straight, progress=False)
    assert train(interrupted, stop_after_steps=7, progress=False).step == 7
    assert train(interrupted, progress=False).step == 20
    expected, got = train_losses(tmp_path / "straight"), train_losses(tmp_path / "interrupted")
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_hard_negatives_change_the_loss_and_fraction_limits_them(
    corpus: Path, tmp_path: Path
) -> None:
    plain = micro(corpus, tmp_path / "plain", epochs=1)
    half = micro(
        corpus,
        tmp_path / "half",
        epochs=1,
        objective={"hard_negatives": {"enabled": True, "fraction": 0.5}},
    )
    train(plain, stop_after_steps=2, progress=False)
    train(half, stop_after_steps=2, progress=False)
    first = {r["step"]: r for r in _metrics(tmp_path / "plain") if "loss" in r}
    with_negatives = {r["step"]: r for r in _metrics(tmp_path / "half") if "loss" in r}
    # same batches and weights at step 1; the negatives add columns to image->text only
    assert with_negatives[1]["loss_i2t"] > first[1]["loss_i2t"]
    assert with_negatives[1]["loss_t2i"] == pytest.approx(first[1]["loss_t2i"], rel=1e-5)
    assert 2 <= with_negatives[1]["hard_negatives"] <= 14


USER_CAPTIONS = [
    ("A man in a red shirt stands next to a blue car", (200, 40, 40)),
    ("two black dogs sleeping under a wooden table", (20, 20, 20)),
    ("a little girl holding a big yellow balloon on the left", (230, 220, 40)),
    ("a green bicycle leaning on a white wall", (40, 170, 60)),
    ("a bowl of soup with fresh bread", (180, 120, 60)),
    ("people waiting for a train at night", (30, 30, 80)),
    ("an orange cat above a brown sofa", (240, 140, 30)),
    ("a small boat on a calm blue lake", (40, 80, 220)),
]


def _user_corpus(root: Path, repeats: int = 3) -> Path:
    """Photos-like images with the kind of captions people write (not the generator's)."""
    root.mkdir(parents=True)
    rows = []
    for r in range(repeats):
        for i, (caption, colour) in enumerate(USER_CAPTIONS):
            name = f"img{r}_{i}.jpg"
            image = Image.new("RGB", (40, 32), (90, 90, 90))
            ImageDraw.Draw(image).ellipse((4 + r, 4, 24 + r, 24), fill=colour)
            image.save(root / name, quality=90)
            split = "test" if r == repeats - 1 else "train"
            rows.append(
                {"filepath": name, "caption": caption, "image_id": f"{r}-{i}", "split": split}
            )
    path = root / "captions.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "caption", "image_id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_hard_negatives_train_on_captions_that_are_not_the_synthetic_corpus(
    tmp_path: Path,
) -> None:
    path = _user_corpus(tmp_path / "photos")
    captions = [c for c, _ in USER_CAPTIONS]
    report = coverage(captions)
    assert report["any"] == pytest.approx(100 * 6 / 8)  # soup and the train have nothing
    config = TrainConfig.model_validate(
        {
            "model": "cots-micro",
            "data": {"train": str(path), "val_split": None, "eval_splits": ["test"]},
            "output": str(tmp_path / "run"),
            "batch_size": 8,
            "max_steps": 4,
            "warmup_steps": 1,
            "log_every": 1,
            "threads": 1,
            "objective": {"kind": "clip", **NEGATIVES},
        }
    )
    result = train(config, progress=False)
    rows = [r for r in _metrics(tmp_path / "run") if "hard_negatives" in r]
    assert len(rows) == 4
    # two epochs over the 16 train images, 12 of whose captions have something to swap
    assert sum(r["hard_negatives"] for r in rows) == 24
    test = result.evals["test"]
    assert test["binding_coverage"] == pytest.approx(75.0)
    assert 0.0 <= test["binding_acc"] <= 100.0


def test_learn_new_words_moves_only_the_embeddings_of_unseen_words(
    corpus: Path, tmp_path: Path
) -> None:
    clip: dict[str, Any] = {"kind": "clip", "queue_size": 0}
    data: dict[str, Any] = {"val_split": None, "eval_splits": []}
    train(micro(corpus, tmp_path / "a", objective=clip, data=data, epochs=1), progress=False)
    # The same images, captions with words the first run never read.
    with corpus.open() as f:
        rows = list(csv.DictReader(f))
    novel = corpus.parent / "novel.csv"
    with novel.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "caption": f"zorbly {row['caption']} flimflams"})
    words = micro(
        novel,
        tmp_path / "b",
        objective=clip,
        data=data,
        epochs=1,
        freeze=["image", "text"],
        init_from=str(tmp_path / "a" / "checkpoint.pt"),
        learn_new_words=str(corpus),
    )
    train(words, progress=False)
    before = trained_towers(tmp_path / "a" / "checkpoint.pt")
    after = trained_towers(tmp_path / "b" / "checkpoint.pt")
    seen = torch.unique(tokenize([r["caption"] for r in rows if r["split"] == "train"], 32))
    new = torch.unique(tokenize(["zorbly flimflams"], 32))
    new = new[~torch.isin(new, seen)]
    assert len(new) >= 2
    old_rows, new_rows = (t.text.token_embedding.weight for t in (before, after))
    assert torch.equal(old_rows[seen], new_rows[seen])
    assert not torch.equal(old_rows[new], new_rows[new])
    for name, tensor in before.state_dict().items():
        if name != "text.token_embedding.weight" and name in after.state_dict():
            assert torch.equal(tensor, after.state_dict()[name]), name
    known = tokenize(["a small red circle on the left"], 32)
    with torch.no_grad():
        assert torch.equal(before.eval().encode_text(known), after.eval().encode_text(known))
    with pytest.raises(ValueError, match="learn_new_words needs 'text' in freeze"):
        micro(corpus, tmp_path / "c", objective=clip, learn_new_words=str(corpus))


def test_similar_batches_open_with_one_colour_and_keep_every_item_once() -> None:
    captions = [[f"a {colour} circle"] for colour in ("red", "blue", "green", "pink")] * 40
    captions += [["a dog on the beach"]] * 40
    keys = colour_keys(captions)
    assert keys[:4] == [0, 2, 1, 7]
    assert keys[-1] == -1
    sampler = EpochBatches([1] * len(captions), 20, seed=3, similar=keys, similar_share=0.5)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        items = [key[0] for batch in batches for key in batch]
        assert len(items) == len(set(items)) == 200
        opening = [len({keys[key[0]] for key in batch[:10]}) for batch in batches]
        assert sum(opening) <= len(batches) + 4  # at most a few batches straddle two colours
        rest = [len({keys[key[0]] for key in batch[10:]}) for batch in batches]
        assert max(rest) >= 3  # the other half is the random draw it was
    sampler.set_epoch(1, start_batch=4)
    assert list(sampler) == batches[4:]  # resumed mid-epoch, the same batches
