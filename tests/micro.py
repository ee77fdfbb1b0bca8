"""Small real models and build requests that several test modules share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from indexer.build_spec import BuildSpec


def train_micro(corpus: Path, output: Path, **overrides: Any) -> Path:
    """cots-micro trained two steps on ``corpus``; returns its checkpoint. ``overrides``
    replace top-level training settings (e.g. cookie, objective, data, video)."""
    from model.config import TrainConfig
    from training.train import train

    config = {
        "model": "cots-micro",
        "data": {"train": str(corpus)},
        "output": str(output),
        "batch_size": 8,
        "max_steps": 2,
        "warmup_steps": 1,
        "threads": 1,
        "objective": {"queue_size": 16},
        **overrides,
    }
    train(TrainConfig.model_validate(config), progress=False)
    return output / "checkpoint.pt"


def build_spec(root: Path, bundle: Path, corpus: Path, **overrides: Any) -> BuildSpec:
    """A build of collection "photos" without decoding processes, in small shards."""
    fields: dict[str, Any] = {
        "collection": "photos",
        "root": root,
        "bundle": bundle,
        "corpus": str(corpus),
        "workers": 0,
        "shard_size": 16,
        "batch_size": 8,
        **overrides,
    }
    return BuildSpec.model_validate(fields)
