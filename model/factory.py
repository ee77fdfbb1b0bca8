"""Builds the two towers from any open_clip model config, ours included.

Our small CPU configs live in ``model/configs/*.json`` in open_clip's format and are registered
with open_clip, so ``ViT-B-32`` and ``cots-tiny`` are built by the same code path.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from model.errors import ModelError

CONFIG_DIR = Path(__file__).parent / "configs"
logger = logging.getLogger("cots.model")


@cache
def _register_configs() -> None:
    open_clip.add_model_config(CONFIG_DIR)


def list_models() -> list[str]:
    _register_configs()
    return list(open_clip.list_models())


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config of ``name``; unknown names fail with the list of known ones."""
    _register_configs()
    config = open_clip.get_model_config(name)
    if config is None:
        ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        raise ModelError(
            f"unknown model config {name!r}; ours: {', '.join(ours)}; "
            "any open_clip name also works (see open_clip.list_models())"
        )
    return config


class Towers(nn.Module):
    """An image tower and a text tower with no cross-attention, projecting into one space.

    ``image_features``/``text_features`` return the projected global feature (not normalised)
    and the token features (patch tokens [B, P, W_v]; text token states [B, L, W_t]) that the
    token-level objectives use. ``encode_image``/``encode_text`` return one L2-normalised
    tensor each, which is what retrieval and the ONNX export need.
    """

    def __init__(self, visual: nn.Module, text: nn.Module, embed_dim: int) -> None:
        super().__init__()
        self.visual = visual
        self.text = text
        self.embed_dim = embed_dim
        # Towers report tokens alongside the pooled feature.
        self.visual.output_tokens = True  # type: ignore[assignment]
        self.text.output_tokens = True  # type: ignore[assignment]

    def image_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.visual(images)
        return pooled, tokens

    def text_features(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, states = self.text(tokens)
        return pooled, states

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image_features(images)[0], dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text_features(tokens)[0], dim=-1)


def create_towers(name: str, pretrained: str | None = None) -> Towers:
    """Build the towers of open_clip model ``name``.

    ``pretrained`` is an open_clip pretrained tag (needs the weights in open_clip's cache or a
    reachable hub) or a local checkpoint file, loaded with ``weights_only=True``. A full
    open_clip CLIP checkpoint works: its text weights are converted to the separate text tower.
    """
    config = model_config(name)
    if pretrained and not Path(pretrained).is_file():
        known = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in known:
            raise ModelError(
                f"--pretrained {pretrained!r} is neither a file nor an open_clip tag for {name} "
                f"(tags: {', '.join(known) or 'none'})"
            )
    try:
        clip = open_clip.create_model(
            name, pretrained=pretrained or None, force_custom_text=True, weights_only=True
        )
    except RuntimeError as error:
        raise ModelError(f"cannot load weights {pretrained!r} into {name}: {error}") from error
    except Exception as error:
        if pretrained and not Path(pretrained).is_file():
            raise ModelError(
                f"could not fetch open_clip weights {name}/{pretrained}: {error}. Without a "
                "network, pass a local checkpoint file instead."
            ) from error
        raise
    return Towers(clip.visual, clip.text, embed_dim=int(config["embed_dim"]))
