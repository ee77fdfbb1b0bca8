"""Small open_clip architectures that tests register, build with random weights and save.

A ViT with CLIP's text tower, a bidirectional SigLIP-style text tower (pooled at the last
position), a bidirectional tower pooled at the end-of-text token, a ResNet image tower and a
model whose tokenizer comes from a model hub: the shapes of real model families at toy size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import open_clip
import torch

_VISION = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8}
_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CONFIGS: dict[str, dict[str, Any]] = {
    "test-zs-vit": {"embed_dim": 24, "vision_cfg": _VISION, "text_cfg": _TEXT},
    # SigLIP's text tower: bidirectional, pools at the last position.
    "test-zs-bidir": {
        "embed_dim": 24,
        "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, "no_causal_mask": True, "pool_type": "last"},
    },
    # Bidirectional but pooling at the end-of-text token: trimming would still change it.
    "test-zs-bidir-argmax": {
        "embed_dim": 24,
        "vision_cfg": _VISION,
        "text_cfg": {**_TEXT, "no_causal_mask": True},
    },
    "test-zs-rn": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
        "text_cfg": _TEXT,
    },
    "test-zs-hubtok": {
        "embed_dim": 24,
        "vision_cfg": _VISION,
        "text_cfg": {
            **_TEXT,
            "vocab_size": 64,
            "hf_tokenizer_name": "example/hub-only-tokenizer",
            "no_causal_mask": True,
            "pool_type": "last",
        },
    },
}


def register_architectures(folder: Path) -> Path:
    """Write the configs to ``folder`` and register them with open_clip (process-wide)."""
    from model.factory import _register_configs

    _register_configs()
    for name, config in CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config), encoding="utf-8")
    open_clip.add_model_config(folder)
    return folder


def saved_weights(name: str, folder: Path) -> tuple[Any, Path]:
    """open_clip's model ``name`` with random weights (seed 0), saved as open_clip saves
    checkpoints: (the model, the file)."""
    torch.manual_seed(0)
    clip: Any = open_clip.create_model(name, force_custom_text=True).eval()
    path = folder / f"{name}.pt"
    torch.save({"state_dict": clip.state_dict()}, path)
    return clip, path
