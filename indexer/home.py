"""Where collections live when a command is not told: one folder and one variable for every
command (``cots index *``, ``serve``, ``worker``, ``demo``, ``quickstart``), so a collection
built by one is found by the next without a flag.

``COTS_INDEX_ROOT`` names the folder; unset, it is ``cots-data/collections`` under the current
directory. The model bundles ``cots quickstart`` exports live beside it, in
``cots-data/bundles``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

INDEX_ROOT_VARIABLE: Final = "COTS_INDEX_ROOT"
DEFAULT_INDEX_ROOT: Final = Path("cots-data/collections")


def default_index_root() -> Path:
    """The collections folder: ``$COTS_INDEX_ROOT``, else :data:`DEFAULT_INDEX_ROOT`."""
    value = os.environ.get(INDEX_ROOT_VARIABLE, "").strip()
    return Path(value) if value else DEFAULT_INDEX_ROOT


def bundles_folder(index_root: Path) -> Path:
    """Where ``cots quickstart`` keeps the model bundles it exports: beside the collections."""
    return index_root.parent / "bundles"
