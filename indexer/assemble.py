"""The second half of a build: encoded shards -> a complete, published index bundle version.

A version folder holds ``index.json`` (which segments it is made of, counts, the model bundle)
and ``deleted.npy`` (its delete set: tombstoned ids, ascending). A build writes one segment
(``indexer.segments``: FAISS index, ids, stored vectors so that compaction and a change of
index type need no re-encoding, metadata) inside the staging folder; it is published by
:func:`indexer.versions.publish`, which moves the segment beside the others and makes the
version current. Format 1 versions (before segments) held those files themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from indexer.build_spec import MODALITY, BuildSpec
from indexer.digests import file_digest
from indexer.errors import CollectionError
from indexer.faiss_choice import choose_factory
from indexer.index_bundle import DELETED, FORMAT_VERSION, SEGMENTS, IndexInfo, segment_file_key
from indexer.metadata import Item
from indexer.segments import (
    SEGMENT_JSON,
    index_fields,
    new_segment_id,
    read_segment_info,
    write_segment,
)
from indexer.versions import publish, staging
from runtime.bundle import BundleManifest


def assemble_version(
    spec: BuildSpec,
    manifest: BundleManifest,
    shards: Sequence[Any],
    skipped: dict[str, int],
    progress: Any = None,
) -> int:
    """Index the shards' vectors, write the version in a staging folder, publish it.
    ``skipped`` counts the corpus items left out, per reason."""
    ids = np.concatenate([s.ids for s in shards]) if shards else np.zeros(0, np.int64)
    vectors = (
        np.concatenate([s.vectors for s in shards])
        if shards
        else np.zeros((0, manifest.embed_dim), np.float32)
    )
    items = [item for shard in shards for item in shard.items]
    if len(ids) == 0:
        raise CollectionError("no item of the corpus could be encoded; see the skipped items above")
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
                model_bundle_path=str(Path(spec.bundle).resolve()),
                recall_at_10=0.0,
                build=spec.model_dump(mode="json"),
                skipped=skipped,
                created=datetime.now(UTC).isoformat(timespec="seconds"),
            ),
        )
        return publish(spec.root, spec.collection, staged, spec.keep_versions)


def write_version(
    folder: Path,
    ids: np.ndarray,
    vectors: np.ndarray,
    items: Sequence[Item],
    factory: str,
    info: IndexInfo,
) -> IndexInfo:
    """Write a version of one segment (``vectors`` indexed as ``factory``, ``items`` their
    rows) and an empty delete set into the staging ``folder``. Returns its ``index.json``
    content, recall measured."""
    segment_id = new_segment_id()
    segment = folder / SEGMENTS / segment_id
    written = write_segment(segment, ids, vectors, items, factory, index_fields(info.build))
    final = info.model_copy(
        update={
            "format_version": FORMAT_VERSION,
            "factory": factory,
            "count": written.count,
            "live": written.count,
            "recall_at_10": written.recall_at_10,
            "segments": [segment_id],
            "tombstones": 0,
            "max_id": max(info.max_id, written.last_id),
        }
    )
    np.save(folder / DELETED, np.zeros(0, dtype=np.int64))
    final = seal(final, folder)
    final.write(folder)
    return final


def seal(info: IndexInfo, staged: Path) -> IndexInfo:
    """``info`` with the digests of the files of the version staged in ``staged`` (its delete
    set written): the entries of segments ``info`` already carries are kept (a segment is
    hashed once in its life); a new segment's come from its ``segment.json`` (inside
    ``staged``), plus that file's own digest."""
    shared = staged.parent.parent / SEGMENTS
    files = {DELETED: file_digest(staged / DELETED)}
    for segment_id in info.segments:
        prefix = segment_file_key(segment_id, "")
        kept = {key: d for key, d in info.files.items() if key.startswith(prefix)}
        if kept:
            files |= kept
            continue
        folder = staged / SEGMENTS / segment_id
        if not folder.is_dir():  # a segment of a version written before checksums
            folder = shared / segment_id
        files[segment_file_key(segment_id, SEGMENT_JSON)] = file_digest(folder / SEGMENT_JSON)
        for name, digest in read_segment_info(folder).files.items():
            files[segment_file_key(segment_id, name)] = digest
    return info.model_copy(update={"files": files})
