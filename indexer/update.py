"""``cots index add | remove``: changes to a live collection, each a new version.

A change writes only what it changes. The new version folder (``index.json`` and
``deleted.npy``) names the live version's segments, plus for an add one new segment staged
with it; :func:`indexer.versions.publish` moves the segment beside the others and makes the
version current. Readers of the old version are never disturbed (segments are immutable), and
a failed change leaves nothing live changed: its staging folder, new segment included, is
deleted.

- add: new records get ids after the largest ever given (``IndexInfo.max_id``), in a new
  segment of their own: `Flat` below 50,000 vectors (exact; no training on few points), else
  what ``choose_factory`` picks for its size. Cost: the encoder's time plus O(added items).
- remove: a new delete set, the old one plus the removed ids (tombstones); the vectors stay in
  their segments, and searches skip them, until compaction (``indexer.compaction``) drops them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.assemble import DELETED
from indexer.build import STRIDE, ShardEncoder, list_records, skipped_summary
from indexer.bundle import read_manifest
from indexer.collection import Collection
from indexer.encoder import Encoder
from indexer.errors import CollectionError
from indexer.faiss_index import choose_factory
from indexer.metadata import Item
from indexer.segments import new_segment_id, write_segment
from indexer.spec_index import BuildSpec
from indexer.versions import SEGMENTS, publish, staging


def _writable(collection: Collection) -> None:
    if collection.info.format_version < 2:
        raise CollectionError(
            f"collection {collection.info.collection!r} version {collection.version} is in index "
            "format 1 (written before segments); run `cots index compact "
            f"{collection.info.collection}` once to rewrite it as segments, then change it"
        )


def publish_change(
    root: Path,
    collection: Collection,
    deleted: np.ndarray,
    keep_versions: int,
    *,
    added: tuple[np.ndarray, np.ndarray, Sequence[Item], str] | None = None,
    update: dict[str, Any] | None = None,
) -> int:
    """Publish a version naming ``collection``'s segments (plus one written from ``added`` =
    (ids, vectors, items, factory)) with the delete set ``deleted``; returns its number."""
    info = collection.info
    name = info.collection
    segments = list(info.segments)
    with staging(root, name) as staged:
        count, recall, max_id = info.count, info.recall_at_10, info.max_id
        if added is not None:
            ids, vectors, items, factory = added
            segment_id = new_segment_id()
            written = write_segment(staged / SEGMENTS / segment_id, ids, vectors, items, factory)
            segments.append(segment_id)
            count += written.count
            recall = min(recall, written.recall_at_10)
            max_id = max(max_id, written.last_id)
        deleted = np.unique(np.asarray(deleted, dtype=np.int64))
        np.save(staged / DELETED, deleted)
        changed = info.model_copy(
            update={
                "segments": segments,
                "count": count,
                "live": count - len(deleted),
                "tombstones": len(deleted),
                "recall_at_10": recall,
                "max_id": max_id,
                **(update or {}),
            }
        )
        changed.write(staged)
        return publish(root, name, staged, keep_versions)


def add_to_collection(spec: BuildSpec) -> int:
    """Embed ``spec.corpus`` and add it to the live version; returns the new version."""
    manifest = read_manifest(spec.bundle)
    with Collection.open(spec.root, spec.collection) as live:
        info = live.info
        _writable(live)
        if info.model_bundle_id != manifest.bundle_id:
            raise CollectionError(
                f"collection {spec.collection!r} was built with model bundle "
                f"{info.model_bundle_id[:12]}; {spec.bundle} is {manifest.short_id}"
            )
        if info.kind != spec.kind:
            raise CollectionError(
                f"collection {spec.collection!r} holds {info.kind} items, not {spec.kind}"
            )
        records, listing_skipped = list_records(spec)
        first = info.max_id // STRIDE[spec.kind] + 1
        numbered = [(first + i, record) for i, record in enumerate(records)]
        # Verified just above by read_manifest.
        encoder = Encoder(spec.bundle, batch_size=spec.batch_size, verify=False)
        bar = tqdm(total=len(numbered), desc=f"adding to {spec.collection}", unit="item")
        with bar, ShardEncoder(spec, encoder) as shards:
            shard = shards.encode(numbered, bar)
        skipped = Counter(info.skipped)
        skipped.update(skipped_summary([shard], listing_skipped))
        added = None
        if len(shard.ids):
            factory = choose_factory(len(shard.ids), info.dim)
            added = (shard.ids, shard.vectors, shard.items, factory)
        return publish_change(
            spec.root,
            live,
            live.segments.deleted,
            spec.keep_versions,
            added=added,
            update={"skipped": dict(skipped)},
        )


def remove_from_collection(
    root: Path,
    collection: str,
    *,
    ids: Sequence[int] = (),
    filters: dict[str, Any] | None = None,
    keep_versions: int = 3,
) -> tuple[int, int]:
    """Remove items by id and/or by filter; returns (new version, items removed)."""
    if not ids and not filters:
        raise ValueError("name the items to remove: ids, a filter, or both")
    with Collection.open(root, collection) as live:
        _writable(live)
        named = np.asarray(list(ids), dtype=np.int64)
        found = live.get(named)
        doomed = named[[item is not None for item in found]] if len(named) else named
        if filters:
            doomed = np.union1d(doomed, live.ids_matching(filters))
        doomed = np.unique(doomed)
        deleted = np.union1d(live.segments.deleted, doomed)
        return publish_change(root, live, deleted, keep_versions), len(doomed)
