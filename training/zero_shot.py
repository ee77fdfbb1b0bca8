"""Zero-shot bundles: an open_clip model and its weights, ready to export with no training.

``cots export --model NAME --pretrained TAG_OR_FILE`` comes here instead of to a checkpoint.
:func:`pretrained_model` loads the weights (``model.factory.load_open_clip``), reads open_clip's
preprocessing of those weights (image size, mean/std, interpolation, resize mode) and the text
config's context length, and returns the towers with the ``TrainConfig`` an export reads from a
checkpoint. :func:`text_tokenizer` decides which tokenizer the bundle gets: open_clip's BPE for
models with CLIP's tokenizer (the export writes it as for a trained model); a local
``tokenizer.json``, used as given, for a model whose tokenizer comes from a model hub
(SigLIP's), which is refused with the way out named when no file is given. ``training.export``
then writes and checks the bundle exactly as it does for a trained checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip

from model.config import DataConfig, PreprocessConfig, TrainConfig
from model.errors import ModelError
from model.factory import CLIP_VOCAB, Towers, load_open_clip, model_config, towers_of

_RESIZE_MODES = ("shortest",)  # what the runtime's preprocessing (ImageSpec) implements
_INTERPOLATIONS = ("bicubic", "bilinear")


@dataclass(frozen=True)
class PretrainedModel:
    towers: Towers
    config: TrainConfig  # as a checkpoint would record it: model, weights, preprocessing
    context_length: int
    open_clip_config: dict[str, Any]
    tokenizer: Path | None  # a tokenizer.json to ship as is; None: open_clip's BPE


def text_tokenizer(name: str, tokenizer: Path | None) -> Path | None:
    """The tokenizer.json to ship for ``name``, or None for open_clip's own BPE."""
    text_cfg = model_config(name).get("text_cfg", {})
    hub_name = text_cfg.get("hf_tokenizer_name")
    if tokenizer is not None:
        if not tokenizer.is_file():
            raise ModelError(f"--tokenizer {tokenizer} is not a file")
        return tokenizer
    if hub_name:
        raise ModelError(
            f"{name} uses the tokenizer {hub_name!r}, which open_clip fetches from a model hub "
            "and is not available offline; save its tokenizer.json (e.g. from the hub's "
            f"{hub_name} repository) and pass it with --tokenizer FILE"
        )
    if int(text_cfg.get("vocab_size", CLIP_VOCAB)) < CLIP_VOCAB:
        raise ModelError(
            f"{name}'s text vocabulary ({text_cfg.get('vocab_size')} ids) is not open_clip's "
            "BPE; pass its tokenizer.json with --tokenizer FILE"
        )
    return None


def pretrained_model(
    name: str, pretrained: str, tokenizer: Path | None = None, corpus: Path | None = None
) -> PretrainedModel:
    """The towers of ``name`` with the weights ``pretrained`` (an open_clip tag or a local
    file), and everything else an export needs. ``corpus``: a CSV for the parity check."""
    shipped = text_tokenizer(name, tokenizer)  # before the (slow) weights, to fail fast
    clip = load_open_clip(name, pretrained)
    preprocess = _preprocess(name, open_clip.get_model_preprocess_cfg(clip))
    open_clip_config = model_config(name)
    context_length = int(open_clip_config.get("text_cfg", {}).get("context_length", 77))
    data = DataConfig(
        train=corpus or Path("-"), train_split=None, val_split=None, group_key=None, split_key=None
    )
    config = TrainConfig(model=name, pretrained=pretrained, preprocess=preprocess, data=data)
    return PretrainedModel(
        towers_of(clip, name).eval(), config, context_length, open_clip_config, shipped
    )


def _preprocess(name: str, cfg: dict[str, Any]) -> PreprocessConfig:
    size = cfg.get("size", 224)
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ModelError(f"{name} takes {size[0]}x{size[1]} images; only square sizes work")
        size = size[0]
    resize_mode = cfg.get("resize_mode", "shortest")
    interpolation = cfg.get("interpolation", "bicubic")
    if resize_mode not in _RESIZE_MODES or interpolation not in _INTERPOLATIONS:
        raise ModelError(
            f"{name}'s weights expect images resized with mode {resize_mode!r} and "
            f"{interpolation!r} interpolation; the runtime implements modes "
            f"{', '.join(_RESIZE_MODES)} and {', '.join(_INTERPOLATIONS)} interpolation"
        )
    return PreprocessConfig(
        image_size=int(size),
        resize_mode=resize_mode,
        interpolation=interpolation,
        mean=tuple(cfg.get("mean", PreprocessConfig().mean)),
        std=tuple(cfg.get("std", PreprocessConfig().std)),
    )
