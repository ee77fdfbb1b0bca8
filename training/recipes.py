"""Training recipes and config files: JSON files of training-config overrides, the shipped
ones among them, read into a validated :class:`model.config.TrainConfig`.

A recipe (``training/recipes/*.json``) holds the settings a run changes from
:class:`model.config.TrainConfig`'s defaults, nested as in any ``cots train --config`` file, and
names the command that uses it in ``"_command"``. Top-level keys that start with ``_`` are notes
(``_command``, ``_note``, the quality bench's row metadata ``_bench``); :func:`strip_notes`
drops them, and :func:`load_train_config` does so for every config file before applying the
command line's ``key=value`` overrides.

- ``demo-image.json``, ``demo-video.json``: the recipes ``cots demo`` trains with;
- ``quality/NN-*.json``: the rows of ``cots bench quality``, in table order (row NN).

They live inside the ``training`` package (package data), not at the top of the checkout, so
that a wheel install (the Docker images') carries them: ``cots demo`` runs there.
``cots train --config demo-image`` (a recipe's name, without ``.json``) reads the shipped file
when no such path exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from model.config import TrainConfig
from model.errors import ModelError

RECIPES = Path(__file__).with_name("recipes")
NOTE_PREFIX = "_"


def recipe_path(name: str) -> Path:
    """The file of recipe ``name`` (e.g. ``demo-video``, ``quality/01-clip-baseline``)."""
    path = RECIPES / f"{name}.json"
    if not path.is_file():
        known = ", ".join(recipe_names())
        raise ModelError(f"no recipe {name!r} in {RECIPES}; recipes: {known}")
    return path


def recipe_names() -> list[str]:
    """Every shipped recipe's name, sorted (so the quality rows are in table order)."""
    return sorted(str(p.relative_to(RECIPES).with_suffix("")) for p in RECIPES.rglob("*.json"))


def read_recipe(path: Path) -> dict[str, Any]:
    """A recipe or config file as written, notes included."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ModelError(f"config file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ModelError(f"config file {path} must hold a JSON object, not {type(data).__name__}")
    return data


def strip_notes(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` without its top-level note keys (those starting with ``_``)."""
    return {key: value for key, value in data.items() if not key.startswith(NOTE_PREFIX)}


def resolve_config(path: Path) -> Path:
    """``path`` itself when it exists, else the shipped recipe of that name (``demo-image``,
    ``quality/01-clip-baseline``, with or without ``.json``); else ``path`` (whose reading then
    fails, naming it)."""
    if path.exists():
        return path
    name = str(path).removesuffix(".json")
    if name in recipe_names():
        return RECIPES / f"{name}.json"
    return path


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ModelError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value``; the value is JSON when it parses as JSON, else a string."""
    if "=" not in text:
        raise ModelError(f"override {text!r} must look like key=value (e.g. objective.kind=clip)")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def load_train_config(path: Path | None, overrides: list[str]) -> TrainConfig:
    """The config file at ``path`` (or the shipped recipe of that name),
    its top-level note keys (``_command``, ``_note``, ...) dropped, then ``key=value``
    overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        data = strip_notes(read_recipe(resolve_config(Path(path))))
    for override in overrides:
        _set_dotted(data, *parse_override(override))
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        raise ModelError(f"bad training config: {problems}") from None
