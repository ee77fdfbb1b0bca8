"""Token-level, COOKIE and video objectives: each trains a few steps and its loss goes down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from model.aux_inputs import AuxInputs, augment_view, make_aux_inputs
from model.config import TrainConfig, VideoConfig
from model.data.synth import SynthConfig, generate_corpus
from model.distributed import DistInfo
from model.errors import ModelError
from model.factory import MASK_TOKEN_ID, build_towers, create_towers, ensure_mask_token
from model.masking import IGNORE_INDEX
from model.objectives import AuxiliaryLosses, Features, OnlineModel, build_objective
from model.visual_tokenizer import TokenizerConfig, VisualTokenizer, save_tokenizer
from tests.run_start import RunStarts
from tests.test_token_video import captions
from tests.test_training import train_losses
from training.checkpoint import load_checkpoint
from training.eval_splits import towers_state
from training.evaluate import intra_modal_metrics
from training.recipes import load_train_config
from training.train import train


def fixed_batch(batch: int = 16, frames: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    shape = (batch, frames) if frames else (batch,)
    # smooth images, so a view shifted by a few pixels still resembles its original
    coarse = torch.randn(batch * (frames or 1), 3, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear").view(
        *shape, 3, 32, 32
    )
    tokens = captions(batch, 48, 12, g)
    return images, tokens, torch.arange(batch)


def train_fixed_batch(
    overrides: dict[str, Any], steps: int, frames: int | None = None, visual_tokenizer=None
) -> list[dict[str, float]]:
    """``steps`` optimiser steps of cots-micro on one fixed batch; the logged parts of each."""
    torch.manual_seed(0)
    config = TrainConfig.model_validate({"model": "cots-micro", **overrides})
    codebook_size = visual_tokenizer.config.codebook_size if visual_tokenizer else None
    online = OnlineModel(build_towers(config), config.objective, codebook_size)
    # the run's length, which the COTS schedules are fractions of
    objective = build_objective(online, config.objective, DistInfo(), visual_tokenizer, steps)
    optimizer = torch.optim.AdamW(online.parameters(), lr=2e-3)
    images, tokens, groups = fixed_batch(frames=frames)
    grid = online.towers.patch_grid if images.ndim == 4 else None
    history = []
    for step in range(steps):
        aux = make_aux_inputs(
            config.objective, images, tokens, grid, torch.Generator().manual_seed(step)
        )
        features = online(images, tokens, aux)
        out = objective(features, groups, online=online, images=images, tokens=tokens, aux=aux)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(out.parts)
    return history


def first_last(history: list[dict[str, float]], key: str, n: int = 3) -> tuple[float, float]:
    values = [h[key] for h in history]
    return sum(values[:n]) / n, sum(values[-n:]) / n


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tokenizer = VisualTokenizer(TokenizerConfig(image_size=32, patch_size=8, codebook_size=32))
    tokenizer(fixed_batch()[0])  # one training-mode pass initialises the codebook from data
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.pt"
    save_tokenizer(tokenizer.eval(), path, {})
    return path


def test_masked_language_modeling_loss_goes_down() -> None:
    history = train_fixed_batch({"objective": {"kind": "clip", "masked": {"mlm_weight": 1}}}, 25)
    start, end = first_last(history, "loss_mlm")
    assert end < 0.8 * start


def test_masked_vision_modeling_loss_goes_down(tokenizer_file: Path) -> None:
    from model.visual_tokenizer import load_tokenizer

    masked = {"mvm_weight": 1, "visual_tokenizer": str(tokenizer_file)}
    history = train_fixed_batch(
        {"objective": {"kind": "cots", "queue_size": 32, "masked": masked}},
        25,
        visual_tokenizer=load_tokenizer(tokenizer_file),
    )
    start, end = first_last(history, "loss_mvm")
    assert end < 0.8 * start


def test_cookie_head_and_intra_modal_losses_go_down() -> None:
    history = train_fixed_batch(
        {"objective": {"kind": "clip", "intra": {"weight": 1}}, "cookie": {"enabled": True}}, 25
    )
    for key in ("loss_i2i", "loss_t2t", "loss"):
        start, end = first_last(history, key)
        assert end < 0.8 * start, key


@pytest.mark.parametrize("pooling", ["temporal", "mean"])
def test_video_training_loss_goes_down(pooling: str) -> None:
    overrides = {
        "data": {"modality": "video"},
        "video": {"pooling": pooling},
        # no queue: a filling queue adds negatives, which raises the loss as it goes; hard
        # targets: soft ones (distillation) put a floor of their entropy under the loss
        "objective": {"kind": "cots", "queue_size": 0, "distill_alpha": 0.0},
    }
    start, end = first_last(train_fixed_batch(overrides, 20, frames=4), "loss")
    assert end < 0.7 * start


def test_filtered_pairs_do_not_reach_the_token_losses() -> None:
    config = TrainConfig.model_validate({"objective": {"masked": {"mlm_weight": 1}}}).objective
    losses = AuxiliaryLosses(config, visual_tokenizer=None)
    labels = torch.full((4, 6), IGNORE_INDEX)
    labels[:, 1] = torch.tensor([5, 6, 7, 8])
    logits = torch.randn(4, 20)
    features = Features(
        torch.zeros(4, 8), torch.zeros(4, 2, 8), torch.zeros(4, 8), torch.zeros(4, 6, 8),
        torch.tensor(0.07), mlm_logits=logits,
    )  # fmt: skip
    aux = AuxInputs(mlm_labels=labels)
    keep = torch.tensor([1.0, 1.0, 0.0, 0.0])
    before, _ = losses(features, aux, torch.zeros(4, 3, 32, 32), torch.arange(4), keep)
    logits[2:] = torch.randn(2, 20) * 10  # the dropped pairs' predictions change wildly
    after, _ = losses(features, aux, torch.zeros(4, 3, 32, 32), torch.arange(4), keep)
    assert torch.allclose(before, after)


def test_mask_token_is_a_spare_row_and_grows_pretrained_vocabularies() -> None:
    towers = create_towers("cots-micro")
    text: Any = towers.text
    rows = text.token_embedding.num_embeddings
    assert ensure_mask_token(towers) == MASK_TOKEN_ID < rows  # our configs ship the row
    text.token_embedding = torch.nn.Embedding(MASK_TOKEN_ID, 64)  # as open_clip's
    before = text.token_embedding.weight.detach().clone()
    ensure_mask_token(towers)
    assert text.token_embedding.num_embeddings == MASK_TOKEN_ID + 1
    assert torch.equal(text.token_embedding.weight[:MASK_TOKEN_ID], before)


def test_masked_patches_use_the_mask_embedding_and_only_they_change_at_the_input() -> None:
    towers = create_towers("cots-micro").eval()
    images = fixed_batch(2)[0]
    none = torch.zeros(2, 16, dtype=torch.bool)
    assert torch.allclose(
        towers.masked_patch_tokens(images, none, torch.zeros(64)), towers.image_features(images)[1]
    )
    patch_mask = none.clone()
    patch_mask[:, :4] = True
    # Every image masked at the same patches with the same embedding: the masked images
    # differ only where nothing is masked, so equal inputs give equal tokens.
    same = images.clone()
    same[1, :, 8:, :] = images[0, :, 8:, :]  # rows 1..3 of the patch grid equal, row 0 differs
    tokens = towers.masked_patch_tokens(same, patch_mask, torch.ones(64))
    assert torch.allclose(tokens[0], tokens[1], atol=1e-5)


def test_second_view_shifts_and_relights_but_keeps_the_shape() -> None:
    images = torch.randn(4, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    view = augment_view(images, 2, 0.1, g)
    assert view.shape == images.shape
    assert not torch.equal(view, images)
    assert torch.equal(augment_view(images, 0, 0.0, g), images)


def test_intra_modal_metrics_exclude_the_query_itself() -> None:
    image = torch.eye(3)
    text = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1]])
    text = torch.nn.functional.normalize(text, dim=-1)
    groups, text_groups = torch.arange(3), torch.tensor([0, 0, 1, 2])
    metrics = intra_modal_metrics(image, image, text, groups, text_groups)
    assert metrics["i2i_R@1"] == 100.0
    assert metrics["t2t_R@1"] == 100.0  # only the two captions of image 0 are queries
    assert metrics["t2t_medr"] == 1.0


def test_config_rejects_inconsistent_token_and_video_options() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        TrainConfig.model_validate({"objective": {"masked": {"mvm_weight": 1}}})
    with pytest.raises(ValueError, match="cookie"):
        TrainConfig.model_validate({"objective": {"intra": {"weight": 1}}})
    with pytest.raises(ValueError, match="frames"):
        TrainConfig.model_validate({"video": {"frames": 20}})


def test_the_old_visual_tokenizer_key_still_loads(tmp_path: Path) -> None:
    """``objective.masked.tokenizer``, the key's name before it said "visual", still loads as
    ``visual_tokenizer`` from a dict, a config file, ``--set`` and an old checkpoint's config
    (resuming compares it equal to today's); configs are written with the new name only."""
    from training.train import _with_defaults

    old = {"objective": {"masked": {"mvm_weight": 1, "tokenizer": "vt.pt"}}}
    new = {"objective": {"masked": {"mvm_weight": 1, "visual_tokenizer": "vt.pt"}}}
    config = TrainConfig.model_validate(old)
    assert config.objective.masked.visual_tokenizer == Path("vt.pt")
    assert config == TrainConfig.model_validate(new)
    dumped = config.model_dump(mode="json")
    assert "tokenizer" not in dumped["objective"]["masked"]
    assert dumped["objective"]["masked"]["visual_tokenizer"] == "vt.pt"
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert load_train_config(path, []) == config
    overrides = ["objective.masked.mvm_weight=1", "objective.masked.tokenizer=vt.pt"]
    assert load_train_config(None, overrides) == config
    assert _with_defaults(old) == dumped


@pytest.fixture(scope="module")
def av_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("av-corpus") / "corpus"
    generate_corpus(
        out, SynthConfig(seed=3, n_images=120, n_videos=40, image_size=32, video_size=32), workers=2
    )
    return out


def base_run(corpus: Path, output: Path, **overrides: Any) -> TrainConfig:
    config: dict[str, Any] = {
        "model": "cots-micro",
        "data": {"train": str(corpus / "images.csv")},
        "output": str(output),
        "batch_size": 16,
        "epochs": 2,
        "warmup_steps": 2,
        "log_every": 1,
        "checkpoint_every": 3,
        "objective": {"queue_size": 64},
        "threads": 1,
    }
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(config)


def test_masked_run_resumes_exactly(av_corpus: Path, tmp_path: Path, tokenizer_file: Path) -> None:
    """Masks and views come from (seed, step): a resumed run repeats them exactly."""
    masked = {"mlm_weight": 1.0, "mvm_weight": 1.0, "visual_tokenizer": str(tokenizer_file)}
    objective = {"queue_size": 64, "masked": masked}
    straight = base_run(av_corpus, tmp_path / "a", objective=objective, max_steps=8)
    interrupted = base_run(av_corpus, tmp_path / "b", objective=objective, max_steps=8)
    train(straight, progress=False)
    train(interrupted, stop_after_steps=4, progress=False)
    train(interrupted, progress=False)

    def losses(path: Path) -> dict[int, tuple[float, float]]:
        lines = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss_mlm"], r["loss_mvm"]) for r in lines if "loss_mlm" in r}

    expected, got = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_a_video_run_with_reversed_clips_resumes_exactly(av_corpus: Path, tmp_path: Path) -> None:
    """Reversed clips are drawn from the global generator the checkpoint keeps: a resumed run
    plays the same clips backwards as an uninterrupted one."""
    video_data: dict[str, Any] = {
        "modality": "video",
        "train": str(av_corpus / "videos.csv"),
        "group_key": "video_id",
        "val_split": None,
        "eval_splits": [],
    }
    options: dict[str, Any] = {
        "data": video_data,
        "batch_size": 8,
        "max_steps": 8,
        "objective": {"kind": "clip", "queue_size": 0, "time_order_weight": 1.0},
    }
    reversed_clips = {"video": VideoConfig(reverse_share=0.5)}
    straight = base_run(av_corpus, tmp_path / "a", **options).model_copy(update=reversed_clips)
    interrupted = base_run(av_corpus, tmp_path / "b", **options).model_copy(update=reversed_clips)
    train(straight, progress=False)
    train(interrupted, stop_after_steps=4, progress=False)
    train(interrupted, progress=False)
    expected, got = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_video_run_starts_from_image_towers_and_evaluates_t2v(
    av_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_run = base_run(av_corpus, tmp_path / "image", objective={"kind": "clip"}, max_steps=2)
    train(image_run, progress=False)
    source = towers_state(load_checkpoint(tmp_path / "image" / "checkpoint.pt")["model"])
    starts = RunStarts(monkeypatch)
    video_data = {
        "modality": "video",
        "train": str(av_corpus / "videos.csv"),
        "group_key": "video_id",
        "eval_splits": ["test"],
    }
    video = base_run(
        av_corpus,
        tmp_path / "video",
        data=video_data,
        batch_size=8,
        max_steps=3,
        init_from=str(tmp_path / "image" / "checkpoint.pt"),
    )
    result = train(video, progress=False)
    assert {"t2v_R@1", "v2t_R@10", "t2v_medr"} <= set(result.evals["test"])
    # The same video run without init_from, up to its first step.
    fresh = base_run(av_corpus, tmp_path / "fresh", data=video_data, batch_size=8, max_steps=3)
    train(fresh, stop_after_steps=1, progress=False)
    loaded, unloaded = starts.weights
    # Before its first step the video run holds every weight of the image run's towers; only
    # what the image towers lack (the temporal model) starts fresh.
    assert set(source) < set(loaded)
    assert all(k.startswith("temporal.") for k in set(loaded) - set(source))
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    # A run without init_from starts elsewhere, in both towers: the comparison can tell.
    for tower in ("visual.", "text."):
        shared = [k for k in source if k.startswith(tower) and source[k].is_floating_point()]
        assert shared
        assert any(not torch.equal(unloaded[k], source[k]) for k in shared), tower
    bad = base_run(av_corpus, tmp_path / "bad", init_from=str(tmp_path / "missing.pt"))
    with pytest.raises(ModelError, match="init_from"):
        train(bad, progress=False)


def test_time_order_loss_teaches_the_temporal_model_order_and_not_mean_pooling() -> None:
    def run(pooling: str) -> list[dict[str, float]]:
        overrides = {
            "data": {"modality": "video"},
            "video": {"pooling": pooling},
            "objective": {"kind": "clip", "time_order_weight": 1.0},
        }
        return train_fixed_batch(overrides, 20, frames=4)

    temporal = run("temporal")
    start, end = first_last(temporal, "loss_time_order")
    assert end < 0.7 * start
    assert temporal[-1]["time_order_accuracy"] > 0.7
    mean = run("mean")  # a reversed clip has the same mean: the loss stays at log 2
    assert all(abs(h["loss_time_order"] - 0.6931) < 1e-3 for h in mean)
