"""A collection with planted near-duplicates and dates, in a model bundle's space.

Random unit vectors (no encoder: the tests need vectors whose neighbours they know), written by
the real writer (``write_version`` + ``publish``) with the bundle's id, so ``cots serve``
serves it next to encoder-built collections. In a space of the micro bundle's dimension two
random vectors are far apart (|cosine| well under 0.9), so the planted groups are the only
items this close.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np

from indexer.assemble import write_version
from indexer.index_bundle import IndexInfo
from indexer.metadata import Item
from indexer.versions import publish, staging
from runtime.bundle import read_manifest

COUNT = 60
IDENTICAL = (3, 40)  # the same vector twice
NEAR = (7, 8)  # 8 is 7 moved a little (cosine ~0.995)
TRIPLE = (20, 21, 22)  # 21 and 22 are each 20 moved a little
CAPTION_TWIN = (50, 59)  # 59 is a caption with 50's vector: not an image, never a duplicate
NO_DATE = frozenset({5, 9, 14, 33})  # items without "taken"
PLANTED_GROUPS = [list(TRIPLE), list(IDENTICAL), list(NEAR)]  # size, then first id


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def planted_vectors(dim: int, seed: int = 5) -> np.ndarray:
    """[COUNT, dim] unit vectors with the planted groups above."""
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((COUNT, dim)))

    def near(of: int) -> np.ndarray:
        return _unit(x[of] + 0.1 * _unit(rng.standard_normal(dim)))

    x[IDENTICAL[1]] = x[IDENTICAL[0]]
    x[NEAR[1]] = near(NEAR[0])
    x[TRIPLE[1]] = near(TRIPLE[0])
    x[TRIPLE[2]] = near(TRIPLE[0])
    x[CAPTION_TWIN[1]] = x[CAPTION_TWIN[0]]
    return x


def taken(item_id: int) -> str | None:
    """The item's date taken: few distinct days (so sorting meets ties), none for NO_DATE."""
    if item_id in NO_DATE:
        return None
    return (date(2024, 1, 1) + timedelta(days=(item_id * 7) % 23)).isoformat()


def planted_items(count: int = COUNT) -> list[Item]:
    items = []
    for i in range(count):
        metadata: dict[str, object] = {"folder": f"f{i % 3}"}
        when = taken(i)
        if when is not None:
            metadata["taken"] = when
        kind = "caption" if i == CAPTION_TWIN[1] else "image"
        caption = f"caption {i}" if kind == "caption" else None
        items.append(
            Item(
                id=i,
                kind=kind,
                uri=f"photos/{i:03d}.jpg",
                caption=caption,
                group_id=f"photos/{i:03d}.jpg",
                metadata=metadata,
            )
        )
    return items


def build_planted(root: Path, name: str, bundle: Path, *, factory: str = "Flat") -> np.ndarray:
    """Write collection ``name`` under ``root`` in ``bundle``'s space; returns its vectors."""
    manifest = read_manifest(bundle, verify=False)
    vectors = planted_vectors(manifest.embed_dim)
    ids = np.arange(COUNT, dtype=np.int64)
    info = IndexInfo(
        collection=name, kind="image", modality="image", count=0, live=0,
        dim=manifest.embed_dim, factory=factory, model_bundle_id=manifest.bundle_id,
        recall_at_10=0.0, build={"index_fields": ["taken", "folder"]},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    with staging(root, name) as staged:
        write_version(staged, ids, vectors, planted_items(), factory, info)
        publish(root, name, staged, keep=3)
    return vectors
