"""Reading a published version the way the tests compare them: its live content, and the
bytes of every file it consists of (its manifest and the segments it names)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from indexer.collection import Collection
from indexer.index_bundle import read_info
from indexer.versions import segments_dir


def _where(folder: Path) -> tuple[Path, str, int]:
    """(index root, collection, version) of ``root/<collection>/versions/<version>``."""
    return folder.parents[2], folder.parents[1].name, int(folder.name)


def version_content(folder: Path) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """(ids ascending, float32 vectors, metadata rows) of a version's live items."""
    root, name, version = _where(folder)
    with Collection.open(root, name, version=version) as collection:
        ids, vectors, items = collection.segments.live_rows()
    order = np.argsort(ids, kind="stable")
    rows = sorted((item.model_dump() for item in items), key=lambda row: row["id"])
    return ids[order], vectors[order], rows


def version_files(folder: Path) -> dict[str, bytes]:
    """Every file of a version: its own and those of the segments it names, by relative path."""
    root, name, _ = _where(folder)
    found = {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
    for segment_id in read_info(folder).segments:
        for path in sorted((segments_dir(root, name) / segment_id).iterdir()):
            found[f"segments/{segment_id}/{path.name}"] = path.read_bytes()
    return found
