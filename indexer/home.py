"""Where collections live when a command is not told: one folder and one variable for every
command (``cots index *``, ``serve``, ``worker``, ``demo``, ``quickstart``), so a collection
built by one is found by the next without a flag.

``COTS_INDEX_ROOT`` names the folder; unset, it is ``cots-data/collections`` under the current
directory. The model bundles ``cots quickstart`` exports live beside it, in
``cots-data/bundles``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
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


def collection_names(index_root: Path) -> list[str]:
    """The collections under ``index_root`` (folders with a ``current`` pointer), sorted."""
    from indexer.versions import CURRENT

    if not index_root.is_dir():
        return []
    return sorted(
        entry.name
        for entry in index_root.iterdir()
        if not entry.name.startswith(".") and (entry / CURRENT).exists()
    )


def bundle_of_collections(index_root: Path, names: Sequence[str] = ()) -> Path:
    """The model bundle that built ``names`` (empty: every collection under ``index_root``),
    when they agree on one that still exists; :class:`CollectionError` names the command or
    option that settles it otherwise."""
    from indexer.errors import CollectionError
    from indexer.index_bundle import read_info
    from indexer.versions import current_dir

    chosen = list(names) or collection_names(index_root)
    if not chosen:
        raise CollectionError(
            f"no collections in {index_root} to serve: make one with `cots quickstart FOLDER "
            "--model NAME --pretrained WEIGHTS` (your photos), `cots index build` or `cots demo`"
            f"{'' if index_root.exists() else f' ({index_root} does not exist)'}"
        )
    paths: dict[str, list[str]] = {}
    for name in chosen:
        info = read_info(current_dir(index_root, name))
        key = info.model_bundle_path or f"(not recorded; bundle id {info.model_bundle_id[:12]})"
        paths.setdefault(key, []).append(name)
    if len(paths) > 1:
        listing = "; ".join(f"{', '.join(names)}: {path}" for path, names in paths.items())
        raise CollectionError(
            f"the collections in {index_root} were built with different model bundles "
            f"({listing}); serve one set with --collection NAME, or name --bundle"
        )
    (path,) = paths
    if path.startswith("(") or not Path(path).is_dir():
        raise CollectionError(
            f"collections {', '.join(chosen)} were built with model bundle {path}, which is "
            "not there now; name it with --bundle (COTS_BUNDLE)"
        )
    return Path(path)
