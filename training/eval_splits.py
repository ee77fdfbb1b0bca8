"""Evaluating a split by name, whatever its modality, and rebuilding a checkpoint's towers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.config import TrainConfig
from model.errors import ModelError
from model.factory import Towers, build_towers
from training.checkpoint import load_checkpoint
from training.evaluate import evaluate
from training.training_data import CaptionedImages, load_split
from training.video_data import CaptionedVideos, evaluate_videos, load_video_split

Split = CaptionedImages | CaptionedVideos


def load_named_split(config: TrainConfig, name: str | None, context_length: int) -> Split:
    if config.data.modality == "video":
        return load_video_split(
            config.data,
            name,
            context_length,
            config.preprocess,
            decode_frames=config.video.decode_frames,
        )
    return load_split(config.data, name, context_length, preprocess=config.preprocess)


def evaluate_loaded(
    towers: Towers, config: TrainConfig, split: Split, device: torch.device
) -> dict[str, float]:
    """t2i/i2t (+ i2i/t2t) metrics for images, t2v/v2t for videos."""
    if isinstance(split, CaptionedVideos):
        return evaluate_videos(towers, split, config.preprocess, device, config.video.frames)
    return evaluate(towers, split, config.preprocess, device)


def towers_state(model_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The towers' part of an OnlineModel state dict."""
    prefix = "towers."
    return {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}


def towers_from_checkpoint(path: Path) -> tuple[Towers, TrainConfig, dict[str, Any]]:
    """The trained towers of a ``cots train`` checkpoint, with its config and raw state."""
    state = load_checkpoint(path)
    config = TrainConfig.model_validate(state["train_config"])
    towers = build_towers(config, pretrained=False)
    try:
        towers.load_state_dict(towers_state(state["model"]))
    except RuntimeError as error:
        raise ModelError(f"{path}: weights do not fit the config it records: {error}") from None
    return towers.eval(), config, state
