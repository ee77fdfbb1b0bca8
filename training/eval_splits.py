"""Evaluating a split by name, whatever its modality (images with their scene-query and binding
checks, their images embedded once), and rebuilding a checkpoint's towers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from model.config import TrainConfig
from model.errors import ModelError
from model.factory import Towers, build_towers
from training.binding_check import binding_check
from training.checkpoint import load_checkpoint
from training.evaluate import evaluate, evaluate_and_embed
from training.scene_eval import scene_query_check
from training.training_data import CaptionedImages, load_split
from training.video_checks import time_checks
from training.video_data import CaptionedVideos, evaluate_videos, load_video_split

Split = CaptionedImages | CaptionedVideos


def load_named_split(
    config: TrainConfig, name: str | None, context_length: int, progress: bool = True
) -> Split:
    """The split ``name`` (None: every item) of the config's corpus; ``progress``: show the
    video decoding bar."""
    if config.data.modality == "video":
        return load_video_split(
            config.data,
            name,
            context_length,
            config.preprocess,
            decode_frames=config.video.decode_frames,
            progress=progress,
        )
    return load_split(config.data, name, context_length, preprocess=config.preprocess)


def evaluate_loaded(
    towers: Towers, config: TrainConfig, split: Split, device: torch.device
) -> dict[str, float]:
    """t2i/i2t (+ i2i/t2t) metrics for images, t2v/v2t for videos."""
    if isinstance(split, CaptionedVideos):
        return evaluate_videos(towers, split, config.preprocess, device, config.video.frames)
    return evaluate(towers, split, config.preprocess, device)


def evaluate_image_checks(
    towers: Towers,
    config: TrainConfig,
    split: CaptionedImages,
    context_length: int,
    device: torch.device,
) -> dict[str, float]:
    """An image split's retrieval metrics, scene-query check (synthetic corpora only) and
    binding check, its images embedded once for all three."""
    metrics, image_emb = evaluate_and_embed(towers, split, config.preprocess, device)
    checked = scene_query_check(towers, config, split, context_length, device, image_emb=image_emb)
    metrics.update(checked[0] if checked else {})
    metrics.update(
        binding_check(towers, split, config.preprocess, context_length, device, image_emb)
    )
    return metrics


def evaluate_checked(
    towers: Towers,
    config: TrainConfig,
    split: Split,
    context_length: int,
    device: torch.device,
) -> dict[str, float]:
    """Recall plus the checks a split's modality has: scene queries and binding for images
    (:func:`evaluate_image_checks`), time order and direction for videos."""
    if isinstance(split, CaptionedImages):
        return evaluate_image_checks(towers, config, split, context_length, device)
    metrics = evaluate_loaded(towers, config, split, device)
    frames = config.video.frames
    metrics.update(time_checks(towers, split, config.preprocess, device, frames, context_length))
    return metrics


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
