"""Fine-tuning from pretrained weights: ``cots train --model NAME --pretrained FILE``.

A small open_clip architecture (``tests/open_clip_archs.py``) is saved with random weights, as
a user's downloaded checkpoint would be, and trained with COTS from it: the momentum towers
start from the same weights, MLM grows the [MASK] row the pretrained vocabulary lacks, the
towers learn at ``pretrained_lr_scale`` times the rate of the new parts, resuming is exact,
and the run exports to a bundle whose parity checks pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from model.config import TrainConfig
from model.data.synth import SynthConfig, generate_corpus
from model.errors import ModelError
from model.factory import CLIP_VOCAB
from tests.open_clip_archs import register_architectures, saved_weights
from training.checkpoint import load_checkpoint
from training.export import ExportOptions, export_bundle
from training.train import train

pytestmark = pytest.mark.slow
MOMENTUM = 0.95


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Path]:
    """(corpus CSV, the open_clip model, its saved weights)."""
    register_architectures(tmp_path_factory.mktemp("configs"))
    root = tmp_path_factory.mktemp("finetune")
    generate_corpus(root, SynthConfig(seed=3, n_images=60, n_videos=0, image_size=32), workers=1)
    clip, weights = saved_weights("test-zs-vit", root)
    return root / "images.csv", clip, weights


def _config(corpus: Path, weights: Path, output: Path, **overrides: Any) -> TrainConfig:
    fields: dict[str, Any] = {
        "model": "test-zs-vit",
        "pretrained": str(weights),
        "pretrained_lr_scale": 0.1,
        "data": {"train": str(corpus), "val_split": None, "eval_splits": []},
        "output": str(output),
        "batch_size": 8,
        "max_steps": 6,
        "warmup_steps": 1,
        "checkpoint_every": 2,
        "log_every": 1,
        "threads": 1,
        "objective": {
            "queue_size": 16,
            "momentum": MOMENTUM,
            "momentum_final": MOMENTUM,
            "masked": {"mlm_weight": 0.1},
        },
        **overrides,
    }
    return TrainConfig.model_validate(fields)


def test_fine_tuning_starts_from_the_weights_resumes_exactly_and_exports(
    setup: tuple[Path, Any, Path], tmp_path: Path
) -> None:
    corpus, clip, weights = setup
    pretrained = {f"visual.{k}": v for k, v in clip.visual.state_dict().items()}
    pretrained |= {f"text.{k}": v for k, v in clip.text.state_dict().items()}

    one_step = _config(corpus, weights, tmp_path / "one", max_steps=1, checkpoint_every=1)
    train(one_step, progress=False)
    state = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    online = {k.removeprefix("towers."): v for k, v in state["model"].items()}
    momentum = {
        k.removeprefix("momentum_towers."): v
        for k, v in state["objective"].items()
        if k.startswith("momentum_towers.")
    }
    # After one step the momentum towers are θ0 or m·θ0 + (1 - m)·θ1: within (1 - m) of the
    # way from the pretrained weights to the online ones, so they started at the former.
    for name, start in pretrained.items():
        if name == "text.token_embedding.weight":
            assert online[name].shape[0] == CLIP_VOCAB + 1  # the [MASK] row, added
            start = torch.cat([start, momentum[name][-1:]])
        moved = (online[name] - start).abs()
        assert torch.all((momentum[name] - start).abs() <= (1 - MOMENTUM) * moved + 1e-6), name
    groups = state["optimizer"]["param_groups"]
    assert sorted({g["lr"] for g in groups}) == pytest.approx([1e-4, 1e-3])

    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(_config(corpus, weights, straight), progress=False)
    assert train(_config(corpus, weights, interrupted), stop_after_steps=3, progress=False).step
    train(_config(corpus, weights, interrupted), progress=False)
    a = load_checkpoint(straight / "checkpoint.pt")
    b = load_checkpoint(interrupted / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for name, tensor in a["model"].items():
        assert torch.allclose(tensor, b["model"][name], atol=1e-6), name

    bundle = export_bundle(
        straight / "checkpoint.pt",
        tmp_path / "bundle",
        ExportOptions(fp16=False, progress=False, check_items=8),
    )
    assert (bundle / "bundle.json").is_file()


def test_models_with_a_hub_tokenizer_are_refused_for_training(
    setup: tuple[Path, Any, Path], tmp_path: Path
) -> None:
    corpus, _, _ = setup
    _, weights = saved_weights("test-zs-hubtok", tmp_path)
    config = _config(corpus, weights, tmp_path / "run", model="test-zs-hubtok")
    with pytest.raises(ModelError, match="example/hub-only-tokenizer"):
        train(config, progress=False)
