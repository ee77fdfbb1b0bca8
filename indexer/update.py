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
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.assemble import seal
from indexer.build_spec import BuildSpec
from indexer.collection import Collection
from indexer.errors import CollectionError
from indexer.faiss_choice import choose_factory
from indexer.filters import Filter, as_filter
from indexer.index_bundle import DELETED, SEGMENTS, IndexInfo, read_info
from indexer.item_ids import next_record_number
from indexer.metadata import Item
from indexer.segments import SegmentInfo, index_fields, new_segment_id, write_segment
from indexer.sharded import refuse_sharded
from indexer.shards import ShardEncoder, list_records, skipped_summary
from indexer.versions import current_dir, locked, publish, reserve_numbers, staging
from runtime.bundle import read_manifest
from runtime.encoder import Encoder


def _writable_info(info: IndexInfo, folder: Path) -> None:
    if info.format_version < 2:
        raise CollectionError(
            f"collection {info.collection!r} version {folder.name} is in index format 1 "
            f"(written before segments); run `cots index compact {info.collection}` once to "
            "rewrite it as segments, then change it"
        )


def _writable(collection: Collection) -> None:
    _writable_info(collection.info, collection.folder)


# A change made on a snapshot of the live version, re-applied to whatever is live when it
# publishes: (live index.json, live delete set) -> (new index.json, new delete set).
Rebase = Callable[[IndexInfo, np.ndarray], tuple[IndexInfo, np.ndarray]]


def commit(
    root: Path,
    name: str,
    staged: Path,
    keep_versions: int,
    rebase: Rebase,
    *,
    format_1: bool = False,
) -> int:
    """Publish ``staged`` (its new segments, if any, already in it) as ``rebase`` applied to
    the version live at that moment, under the collection's lock: changes that ran at once
    compose instead of the later one erasing the earlier. ``format_1``: the live version may
    be one written before segments (compaction rewrites it). Returns the new version."""
    with locked(root, name):
        # A sharded collection's own files are the snapshot it was split from: never changed.
        refuse_sharded(root, name, "this change")
        live = current_dir(root, name)
        info = read_info(live)
        if not format_1:
            _writable_info(info, live)
        had = np.load(live / DELETED) if (live / DELETED).is_file() else np.zeros(0, np.int64)
        changed, deleted = rebase(info, had)
        deleted = np.unique(np.asarray(deleted, dtype=np.int64))
        np.save(staged / DELETED, deleted)
        changed = changed.model_copy(
            update={"live": changed.count - len(deleted), "tombstones": len(deleted)}
        )
        changed = seal(changed, staged)
        changed.write(staged)
        return publish(root, name, staged, keep_versions, held=True)


def add_to_collection(spec: BuildSpec) -> int:
    """Embed ``spec.corpus`` and add it to the live version; returns the new version."""
    manifest = read_manifest(spec.bundle)
    live = current_dir(spec.root, spec.collection)
    info = read_info(live)
    _writable_info(info, live)
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
    first = reserve_numbers(
        spec.root, spec.collection, len(records), next_record_number(spec.kind, info.max_id)
    )
    numbered = [(first + i, record) for i, record in enumerate(records)]
    # Verified just above by read_manifest.
    encoder = Encoder(spec.bundle, batch_size=spec.batch_size, verify=False)
    bar = tqdm(total=len(numbered), desc=f"adding to {spec.collection}", unit="item")
    with bar, ShardEncoder(spec, encoder) as shards:
        shard = shards.encode(numbered, bar)
    skipped = skipped_summary([shard], listing_skipped)
    return add_encoded(
        spec.root,
        spec.collection,
        shard.ids,
        shard.vectors,
        shard.items,
        keep_versions=spec.keep_versions,
        skipped=skipped,
    )


def add_encoded(
    root: Path,
    collection: str,
    ids: np.ndarray,
    vectors: np.ndarray,
    items: Sequence[Item],
    *,
    keep_versions: int = 3,
    skipped: dict[str, int] | None = None,
) -> int:
    """Publish ``vectors`` (with ``ids`` from :func:`reserve_numbers`'s range, and their
    ``items``) as a new segment of the live version; returns the new version."""
    with staging(root, collection) as staged:
        written = None
        if len(ids):
            dim = int(np.asarray(vectors).shape[1])
            folder = staged / SEGMENTS / new_segment_id()
            factory = choose_factory(len(ids), dim)
            build = read_info(current_dir(root, collection)).build
            written = write_segment(folder, ids, vectors, items, factory, index_fields(build))

        def rebase(live: IndexInfo, deleted: np.ndarray) -> tuple[IndexInfo, np.ndarray]:
            merged = Counter(live.skipped)
            merged.update(skipped or {})
            update: dict[str, Any] = {"skipped": dict(merged)}
            if written is not None:
                update |= joined_segment(live, written)
            return live.model_copy(update=update), deleted

        return commit(root, collection, staged, keep_versions, rebase)


def joined_segment(live: IndexInfo, written: SegmentInfo) -> dict[str, Any]:
    """The fields of ``live``'s index.json that change when segment ``written`` joins it."""
    if written.dim != live.dim:
        raise CollectionError(
            f"vectors of dim {written.dim} cannot join collection {live.collection!r} "
            f"of dim {live.dim}"
        )
    return {
        "segments": [*live.segments, written.id],
        "count": live.count + written.count,
        "recall_at_10": min(live.recall_at_10, written.recall_at_10),
        "max_id": max(live.max_id, written.last_id),
    }


def remove_from_collection(
    root: Path,
    collection: str,
    *,
    ids: Sequence[int] = (),
    filters: Filter | Mapping[str, Any] | None = None,
    keep_versions: int = 3,
) -> tuple[int, int]:
    """Remove items by id and/or by filter (``indexer.filters``); returns (new version, items
    removed)."""
    filters = as_filter(filters)
    if not ids and filters is None:
        raise ValueError("name the items to remove: ids, a filter, or both")
    with Collection.open(root, collection, with_indexes=False) as live:
        _writable(live)
        named = np.asarray(list(ids), dtype=np.int64)
        found = live.get(named)
        doomed = named[[item is not None for item in found]] if len(named) else named
        if filters is not None:
            doomed = np.union1d(doomed, live.ids_matching(filters))
        doomed = np.unique(doomed)

    def rebase(info: IndexInfo, deleted: np.ndarray) -> tuple[IndexInfo, np.ndarray]:
        return info, np.union1d(deleted, doomed)

    with staging(root, collection) as staged:
        version = commit(root, collection, staged, keep_versions, rebase)
    return version, len(doomed)
