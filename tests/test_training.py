"""Training, resuming, evaluation and their errors, on a small synthetic corpus and cots-micro."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import open_clip
import pytest
import torch

from model.config import TrainConfig
from model.data.synth import SynthConfig, generate_corpus
from model.errors import ModelError
from model.factory import create_towers
from tests.run_start import RunStarts
from training.checkpoint import load_checkpoint, save_checkpoint
from training.evaluate import evaluate
from training.recipes import load_train_config
from training.train import resolve_image_size, train
from training.training_data import PairDataset, load_split


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train-corpus") / "corpus"
    generate_corpus(out, SynthConfig(seed=1, n_images=200, n_videos=0, image_size=32), workers=2)
    return out / "images.csv"


def micro(corpus: Path, output: Path, **overrides: Any) -> TrainConfig:
    """cots-micro on the 160 train images: 10 steps of 16 per epoch."""
    config: dict[str, Any] = {
        "model": "cots-micro",
        "data": {"train": str(corpus)},
        "output": str(output),
        "batch_size": 16,
        "epochs": 2,
        "warmup_steps": 2,
        "log_every": 1,
        "checkpoint_every": 3,
        "objective": {"queue_size": 64, "filter": {"enabled": True, "warmup_steps": 4}},
        "threads": 1,
    }
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    return TrainConfig.model_validate(config)


def train_losses(output: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def _assert_resume_is_exact(corpus: Path, tmp_path: Path, **overrides: Any) -> None:
    straight = micro(corpus, tmp_path / "straight", **overrides)
    interrupted = micro(corpus, tmp_path / "interrupted", **overrides)
    train(straight, progress=False)
    partial = train(interrupted, stop_after_steps=7, progress=False)
    assert partial.step == 7  # the last checkpoint was at step 6; the kill loses step 7
    resumed = train(interrupted, progress=False)
    assert resumed.step == 20
    expected, got = train_losses(tmp_path / "straight"), train_losses(tmp_path / "interrupted")
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "interrupted" / "checkpoint.pt")
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=1e-6), name
    assert torch.equal(a["objective"]["queues.groups"], b["objective"]["queues.groups"])
    assert a["objective"]["filter.steps"] == b["objective"]["filter.steps"] == 20


def test_resumed_run_continues_exactly(corpus: Path, tmp_path: Path) -> None:
    _assert_resume_is_exact(corpus, tmp_path)


def test_resumed_run_follows_the_objective_schedules_exactly(corpus: Path, tmp_path: Path) -> None:
    """The momentum ramp, the queue warm-up and growth and the distillation ramp all cross the
    interruption at step 7: the schedules' clock is checkpointed with the queues."""
    objective = {
        "queue_size": 64,
        "filter": {"enabled": True, "warmup_steps": 4},
        "momentum": 0.9,
        "momentum_final": 0.99,
        "momentum_ramp": 0.6,  # the run is 20 steps: 12
        "queue_warmup": 0.25,  # 5
        "queue_ramp": 0.3,  # 6
        "distill_alpha": 0.4,
        "distill_warmup": 0.5,  # 10
        "caption_positives": True,
    }
    _assert_resume_is_exact(corpus, tmp_path, objective=objective, grad_clip=1.0)
    state = load_checkpoint(tmp_path / "interrupted" / "checkpoint.pt")
    assert int(state["objective"]["steps"]) == 20
    rows = [json.loads(line) for line in (tmp_path / "interrupted" / "metrics.jsonl").open()]
    momentum = {r["step"]: r["momentum"] for r in rows if "momentum" in r}
    assert momentum[1] == pytest.approx(0.9)
    assert momentum[20] == pytest.approx(0.99)
    used = {r["step"]: r["queue_used"] for r in rows if "queue_used" in r}
    assert used[5] == 0 < used[9]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 train images and nothing else: small enough to memorise in a few dozen steps."""
    out = tmp_path_factory.mktemp("tiny-corpus") / "corpus"
    config = SynthConfig(
        seed=2,
        n_images=20,
        n_videos=0,
        image_size=32,
        val_fraction=0,
        test_fraction=0,
        heldout_fraction=0,
        n_heldout_combinations=0,
    )
    generate_corpus(out, config, workers=1)
    return out / "images.csv"


def trained_towers(checkpoint: Path):
    state = load_checkpoint(checkpoint)
    towers = create_towers(state["model_name"])
    prefix = "towers."
    towers.load_state_dict(
        {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    )
    return towers


@pytest.mark.parametrize(("kind", "at_least"), [("clip", 90.0), ("cots", 40.0)])
def test_training_memorises_a_small_set(
    tiny_corpus: Path, tmp_path: Path, kind: str, at_least: float
) -> None:
    """60 steps over 20 pairs: recall on them climbs well above chance (26.7 mean recall).

    COTS learns more slowly here than the baseline: its keys come from momentum towers that
    lag the online ones and carry no gradient."""
    config = micro(
        tiny_corpus,
        tmp_path / kind,
        epochs=60,
        lr=2e-3,
        warmup_steps=3,
        data={"val_split": None, "eval_splits": []},
        objective={"kind": kind, "queue_size": 32},
    )
    config = resolve_image_size(config)
    pairs = load_split(config.data, "train", 48)
    before = evaluate(create_towers("cots-micro"), pairs, config.preprocess, torch.device("cpu"))
    train(config, progress=False)
    after = evaluate(
        trained_towers(tmp_path / kind / "checkpoint.pt"),
        pairs,
        config.preprocess,
        torch.device("cpu"),
    )
    assert before["mean_recall"] < 35
    assert after["mean_recall"] >= at_least, (before, after)
    losses = train_losses(tmp_path / kind)
    assert sum(losses[s] for s in (58, 59, 60)) < sum(losses[s] for s in (1, 2, 3))


def test_training_evaluates_val_each_epoch_and_test_and_heldout_at_the_end(
    corpus: Path, tmp_path: Path
) -> None:
    train(micro(corpus, tmp_path / "run"), progress=False)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval"]) for r in records if "eval" in r]
    assert evals == [(10, "val"), (20, "val"), (20, "test"), (20, "heldout")]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["evals"]) == {"val", "test", "heldout"}
    assert {"t2i_R@1", "i2t_R@10", "mean_recall", "t2i_medr"} <= set(results["evals"]["test"])
    assert any("filtered_frac" in r for r in records)


def test_checkpoint_from_another_config_is_refused(corpus: Path, tmp_path: Path) -> None:
    train(micro(corpus, tmp_path / "run", epochs=1), progress=False)
    other = micro(corpus, tmp_path / "run", epochs=1, objective={"kind": "clip"})
    with pytest.raises(ModelError, match=r"objective.kind: checkpoint 'cots', now 'clip'"):
        train(other, progress=False)


def test_bad_config_and_missing_data_fail_clearly(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"objective\.colour"):
        load_train_config(None, ["objective.colour=red"])
    with pytest.raises(ModelError, match="batch_size"):
        load_train_config(None, ["batch_size=1"])
    with pytest.raises(ModelError, match="does not exist"):
        load_train_config(tmp_path / "nope.json", [])
    with pytest.raises(ModelError, match=r"nope\.csv"):
        train(micro(tmp_path / "nope.csv", tmp_path / "run"), progress=False)
    with pytest.raises(ModelError, match="unknown model config 'no-such-model'"):
        train(micro(corpus, tmp_path / "run", model="no-such-model"), progress=False)
    with pytest.raises(ModelError, match="cannot fill one batch"):
        train(micro(corpus, tmp_path / "run", batch_size=1000), progress=False)


def test_pretrained_local_checkpoint_and_bad_tag(tmp_path: Path) -> None:
    from model.factory import _register_configs

    _register_configs()
    reference = open_clip.create_model("cots-micro")
    path = tmp_path / "open_clip_micro.pt"
    torch.save({"state_dict": reference.state_dict()}, path)
    towers = create_towers("cots-micro", pretrained=str(path))
    for name, tensor in reference.visual.state_dict().items():
        assert torch.equal(towers.visual.state_dict()[name], tensor), name
    for name, tensor in reference.text.state_dict().items():
        assert torch.equal(towers.text.state_dict()[name], tensor), name
    with pytest.raises(ModelError, match="neither a file nor an open_clip tag"):
        create_towers("cots-micro", pretrained="laion2b_s34b_b79k")
    wrong = tmp_path / "wrong.pt"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}}, wrong)
    with pytest.raises(ModelError, match="cannot load weights"):
        create_towers("cots-micro", pretrained=str(wrong))


def test_towers_return_global_and_token_features() -> None:
    towers = create_towers("cots-micro")
    pooled, patches = towers.image_features(torch.randn(2, 3, 32, 32))
    assert pooled.shape == (2, 64)
    assert patches.shape == (2, 16, 64)
    tokens = open_clip.SimpleTokenizer(context_length=48)(["a red circle", "a blue star"])
    pooled, states = towers.text_features(tokens)
    assert pooled.shape == (2, 64)
    assert states.shape == (2, 48, 64)
    assert torch.allclose(towers.encode_text(tokens).norm(dim=-1), torch.ones(2))


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_gathers_keys_before_enqueue(corpus: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    output = tmp_path / "ddp"
    args = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cots.cli",
        "train",
        "--data",
        str(corpus),
        "--output",
        str(output),
        "--model",
        "cots-micro",
        "--max-steps",
        "3",
        "--quiet",
        "--set",
        "batch_size=8",
        "--set",
        "objective.queue_size=256",
        "--set",
        "threads=1",
        "--set",
        "checkpoint_every=1",
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(output / "checkpoint.pt")
    # 3 steps x 2 ranks x 8 pairs: each rank enqueued the keys of both ranks
    assert int(state["objective"]["queues.filled"]) == 48
    groups = state["objective"]["queues.groups"][:48]
    assert len(set(groups.tolist())) == 48  # both ranks' (distinct) images, none twice


def test_cli_train_and_eval(corpus: Path, tmp_path: Path) -> None:
    cots = str(Path(sys.executable).with_name("cots"))
    output = tmp_path / "cli"
    result = subprocess.run(
        [
            cots,
            "train",
            "--data",
            str(corpus),
            "--output",
            str(output),
            "--model",
            "cots-micro",
            "--max-steps",
            "2",
            "--quiet",
            "--set",
            "batch_size=16",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    result = subprocess.run(
        [cots, "eval", "--checkpoint", str(output / "checkpoint.pt"), "--split", "test"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "test: t2i_R@1" in result.stdout
    assert "mean_recall" in result.stdout
    bad = subprocess.run([cots, "train", "--set", "epochs=zero"], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "epochs" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_diagnostics_only_on_logged_steps_leave_training_unchanged(
    corpus: Path, tmp_path: Path
) -> None:
    """The objective's diagnostics are computed only for the steps the log writes (issue 40
    item 5): a run logging every 4th step, with accumulation, ends with the same weights and
    queue as one logging every step, and its logged records still carry the diagnostics."""
    every = micro(corpus, tmp_path / "every", batch_size=8, accum_steps=2, epochs=1)
    sparse = micro(corpus, tmp_path / "sparse", batch_size=8, accum_steps=2, epochs=1, log_every=4)
    train(every, progress=False)
    train(sparse, progress=False)
    records = [
        json.loads(line)
        for line in (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()
    ]
    logged = [r for r in records if "loss" in r and "step" in r]
    assert [r["step"] for r in logged] == [4, 8, 10]
    assert all("image_erank" in r and "queue_mass" in r for r in logged)
    losses = train_losses(tmp_path / "every")
    for record in logged:
        assert record["loss"] == pytest.approx(losses[record["step"]], rel=1e-6, abs=1e-7)
    a = load_checkpoint(tmp_path / "every" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "sparse" / "checkpoint.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["objective"].items():
        assert torch.equal(tensor, b["objective"][name]), name


def test_gradient_accumulation_counts_optimiser_steps(corpus: Path, tmp_path: Path) -> None:
    config = micro(corpus, tmp_path / "accum", batch_size=8, accum_steps=2, epochs=1)
    result = train(config, progress=False)
    # 160 images / 8 per micro-batch = 20 micro-batches = 10 optimiser steps
    assert result.step == 10
    state = load_checkpoint(tmp_path / "accum" / "checkpoint.pt")
    assert int(state["objective"]["queues.filled"]) == 64  # queue of 64 saw 160 keys
    assert state["scheduler"]["last_epoch"] == 10


@pytest.mark.slow
def test_filter_drops_mostly_the_noisy_pairs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """30 % of the train images get another image's captions; once the model has learnt
    something, the pairs the filter drops are mostly those (a random drop would be 30 %)."""
    out = tmp_path_factory.mktemp("noisy-corpus") / "corpus"
    generate_corpus(out, SynthConfig(seed=4, n_images=1000, n_videos=0, image_size=32), workers=2)
    config = TrainConfig.model_validate(
        {
            "model": "cots-micro",
            "data": {
                "train": str(out / "images.csv"),
                "noise_fraction": 0.3,
                "val_split": None,
                "eval_splits": [],
            },
            "output": str(tmp_path_factory.mktemp("noisy-run")),
            "batch_size": 32,
            "epochs": 8,  # 25 steps each
            "warmup_steps": 3,
            "lr": 2e-3,
            "log_every": 1,
            "checkpoint_every": 1000,
            "objective": {"queue_size": 256, "filter": {"enabled": True, "warmup_steps": 60}},
            "threads": 1,
        }
    )
    train(config, progress=False)
    rows = [json.loads(line) for line in (config.output / "metrics.jsonl").open()]
    precision = [r["filter_precision"] for r in rows if "filter_precision" in r]
    assert len(precision) > 50  # the filter acted on most steps after its warm-up
    # measured 0.66-0.70 (6-10 epochs); the share of noisy pairs is 0.3
    assert sum(precision) / len(precision) > 0.5, precision


def test_a_split_decoded_once_into_memory_gives_the_same_items_and_metrics(
    corpus: Path,
) -> None:
    config = resolve_image_size(micro(corpus, Path("unused")))
    decoded = load_split(config.data, "test", 48)
    cached = load_split(config.data, "test", 48, preprocess=config.preprocess)
    assert decoded.pixels is None
    assert cached.pixels is not None
    assert cached.pixels.dtype == torch.uint8
    assert cached.pixels.shape == (len(cached.records), 3, 32, 32)
    from_disk = PairDataset(decoded, config.preprocess)
    from_memory = PairDataset(cached, config.preprocess)
    for key in [(0, 0), (5, 0), (len(decoded.records) - 1, 0)]:
        assert torch.equal(from_disk[key][0], from_memory[key][0])
    towers = create_towers("cots-micro")
    cpu = torch.device("cpu")
    assert evaluate(towers, decoded, config.preprocess, cpu) == evaluate(
        towers, cached, config.preprocess, cpu
    )


def test_a_split_larger_than_the_cache_budget_is_decoded_per_use(corpus: Path) -> None:
    config = resolve_image_size(micro(corpus, Path("unused")))
    one_image_mb = 3 * 32 * 32 / 2**20
    small = config.data.model_copy(update={"cache_images_mb": 2.5 * one_image_mb})
    assert load_split(small, "test", 48, preprocess=config.preprocess).pixels is None
    never = config.data.model_copy(update={"cache_images_mb": 0})
    assert load_split(never, "test", 48, preprocess=config.preprocess).pixels is None


def test_init_from_starts_both_towers_from_the_checkpoint_and_frozen_ones_stay(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip: dict[str, Any] = {"kind": "clip", "queue_size": 0}
    data: dict[str, Any] = {"val_split": None, "eval_splits": []}
    train(micro(corpus, tmp_path / "a", objective=clip, data=data, epochs=1), progress=False)
    source = trained_towers(tmp_path / "a" / "checkpoint.pt").state_dict()
    starts = RunStarts(monkeypatch)
    frozen = micro(
        corpus,
        tmp_path / "b",
        objective=clip,
        data=data,
        epochs=1,
        freeze=["image"],
        init_from=str(tmp_path / "a" / "checkpoint.pt"),
    )
    train(frozen, progress=False)
    # The same run without init_from, up to its first step.
    fresh = micro(corpus, tmp_path / "c", objective=clip, data=data, epochs=1, freeze=["image"])
    train(fresh, stop_after_steps=1, progress=False)
    loaded, unloaded = starts.weights
    visual = [k for k in source if k.startswith("visual.")]
    text = [k for k in source if k.startswith("text.") and source[k].is_floating_point()]
    assert visual
    assert text
    # Before its first step, the run holds the checkpoint's towers, both of them, ...
    assert loaded.keys() == source.keys()
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    # ... which a run without init_from does not: the comparison can tell them apart.
    assert any(not torch.equal(unloaded[k], source[k]) for k in visual)
    assert any(not torch.equal(unloaded[k], source[k]) for k in text)
    # After training, the frozen tower is still the checkpoint's; the other one moved.
    after = trained_towers(tmp_path / "b" / "checkpoint.pt").state_dict()
    assert all(torch.equal(source[k], after[k]) for k in visual)
    assert any(not torch.equal(source[k], after[k]) for k in text)
    with pytest.raises(ValueError, match="freeze is for the CLIP objective"):
        micro(corpus, tmp_path / "d", freeze=["image"])


def test_a_checkpoint_older_than_a_new_setting_at_its_default_still_resumes(
    corpus: Path, tmp_path: Path
) -> None:
    config = micro(corpus, tmp_path / "run", data={"val_split": None, "eval_splits": []})
    train(config, stop_after_steps=3, progress=False)
    path = tmp_path / "run" / "checkpoint.pt"
    state = load_checkpoint(path)
    del state["train_config"]["freeze"]  # as written before the setting existed
    del state["train_config"]["objective"]["text_anchor"]
    save_checkpoint(path, state)
    assert train(config, progress=False).step == 20
    changed = config.model_copy(update={"lr": 0.5})
    with pytest.raises(ModelError, match="lr: checkpoint"):
        train(changed, progress=False)
