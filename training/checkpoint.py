"""Checkpoints: everything needed to resume exactly, and to export without guessing.

A checkpoint holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)``; it is written to a temporary file and renamed into place,
so a kill mid-write never leaves a broken ``checkpoint.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from model.errors import ModelError

FORMAT = "cots-checkpoint"
VERSION = 1
# Keys of the training config that may differ between the run that wrote a checkpoint and the
# run that resumes it: they do not change what is being trained.
RESUMABLE_DIFFERENCES = {
    "output",
    "max_steps",
    "log_every",
    "checkpoint_every",
    "device",
    "threads",
}


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ModelError(f"{path} is not a loadable checkpoint: {error}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ModelError(f"{path} is not a COTS checkpoint (no format={FORMAT!r} marker)")
    if state.get("version") != VERSION:
        raise ModelError(
            f"{path} has checkpoint version {state.get('version')}, expected {VERSION}"
        )
    return state


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], prefix: str = ""
) -> list[str]:
    """Dotted keys whose values differ, ignoring those a resume may change."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        dotted = f"{prefix}{key}"
        if key in RESUMABLE_DIFFERENCES and not prefix:
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            differences += config_differences(a, b, dotted + ".")
        elif a != b:
            differences.append(f"{dotted}: checkpoint {a!r}, now {b!r}")
    return differences
