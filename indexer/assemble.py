"""The second half of a build: encoded shards -> a complete, published index bundle version.

A version folder holds ``index.faiss``, ``vectors.npy`` + ``ids.npy`` (the float32 vectors in
id order, so ``compact`` and a change of index type need no re-encoding), ``metadata.sqlite``
and ``index.json``. It is written in a staging folder and published by
:func:`indexer.versions.publish`, which makes it current.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from indexer.bundle import BundleManifest, Modality
from indexer.faiss_index import build_index, choose_factory, recall_at_k, save_index
from indexer.metadata import Item, MetadataStore
from indexer.spec_index import BuildSpec, CorpusKind
from indexer.versions import publish, staging

INDEX_JSON: Final = "index.json"
INDEX_FILE: Final = "index.faiss"
VECTORS: Final = "vectors.npy"
IDS: Final = "ids.npy"
METADATA: Final = "metadata.sqlite"
FORMAT_VERSION: Final = 1
RECALL_QUERIES: Final = 200


class IndexInfo(BaseModel):
    """``index.json``: what a reader needs to trust and use a version."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: Literal["cots-index-bundle"] = "cots-index-bundle"
    format_version: int = FORMAT_VERSION
    collection: str
    kind: CorpusKind
    modality: Modality  # what the vectors embed (image, text or video)
    count: int  # vectors in the index (removed ones included until compacted)
    live: int
    dim: int
    factory: str
    metric: Literal["inner_product"] = "inner_product"
    model_bundle_id: str
    recall_at_10: float  # against exact search, on up to 200 of the collection's vectors
    build: dict[str, Any]  # the BuildSpec of the first build, then what updates changed
    skipped: dict[str, int] = {}
    created: str

    def write(self, folder: Path) -> None:
        (folder / INDEX_JSON).write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")


def assemble_version(
    spec: BuildSpec,
    manifest: BundleManifest,
    shards: Sequence[Any],
    listing_skipped: dict[str, int],
    progress: Any = None,
) -> int:
    """Index the shards' vectors, write the version in a staging folder, publish it."""
    from indexer.build import MODALITY, skipped_summary

    ids = np.concatenate([s.ids for s in shards]) if shards else np.zeros(0, np.int64)
    vectors = (
        np.concatenate([s.vectors for s in shards])
        if shards
        else np.zeros((0, manifest.embed_dim), np.float32)
    )
    items = [item for shard in shards for item in shard.items]
    if len(ids) == 0:
        raise ValueError("no item of the corpus could be encoded; see the skipped items above")
    if progress is not None:
        progress(len(ids), len(ids), "indexing")
    with staging(spec.root, spec.collection) as staged:
        budget = spec.memory_budget_mb * 2**20 if spec.memory_budget_mb else None
        factory = spec.factory
        if factory == "auto":
            factory = choose_factory(len(ids), manifest.embed_dim, budget)
        write_version(
            staged,
            ids,
            vectors,
            items,
            factory,
            IndexInfo(
                collection=spec.collection,
                kind=spec.kind,
                modality=MODALITY[spec.kind],
                count=len(ids),
                live=len(ids),
                dim=manifest.embed_dim,
                factory=factory,
                model_bundle_id=manifest.bundle_id,
                recall_at_10=0.0,
                build=spec.model_dump(mode="json"),
                skipped=skipped_summary(shards, listing_skipped),
                created=datetime.now(UTC).isoformat(timespec="seconds"),
            ),
        )
        return publish(spec.root, spec.collection, staged, spec.keep_versions)


def write_version(
    folder: Path,
    ids: np.ndarray,
    vectors: np.ndarray,
    items: Sequence[Item] | None,
    factory: str,
    info: IndexInfo,
    store: MetadataStore | None = None,
) -> IndexInfo:
    """Build the FAISS index over ``vectors`` and write every file of a version to ``folder``.

    ``items`` are added to a new metadata store unless ``store`` (already in ``folder``) is
    given. Returns the final ``index.json`` content, recall measured.
    """
    order = np.argsort(ids, kind="stable")
    ids, vectors = ids[order], np.ascontiguousarray(vectors[order])
    index = build_index(vectors, ids, factory)
    recall = measure_recall(index, ids, vectors)
    save_index(index, folder / INDEX_FILE)
    np.save(folder / VECTORS, vectors)
    np.save(folder / IDS, ids)
    if store is None:
        with MetadataStore.create(folder / METADATA) as created:
            created.add(list(items or []))
            live = created.live_count()
    else:
        live = store.live_count()
    final = info.model_copy(
        update={"factory": factory, "count": len(ids), "live": live, "recall_at_10": recall}
    )
    final.write(folder)
    return final


def measure_recall(index: Any, ids: np.ndarray, vectors: np.ndarray) -> float:
    """Recall@10 against exact search, with a seeded sample of the collection's own vectors as
    queries (what index.json records)."""
    rng = np.random.default_rng(0)
    sample = rng.choice(len(ids), size=min(RECALL_QUERIES, len(ids)), replace=False)
    return recall_at_k(index, vectors, ids, vectors[sample], k=10)


def read_info(folder: Path) -> IndexInfo:
    return IndexInfo.model_validate(json.loads((folder / INDEX_JSON).read_text(encoding="utf-8")))
