"""``cots index add | remove | compact``: changes to a live collection, each a new version.

An update copies the live version to a staging folder, changes the copy and publishes it, so
readers of the old version are never disturbed and a failed update leaves nothing live changed.

- add: new records get ids after the largest one and are added to the existing FAISS index
  (no retraining: IVF centroids stay, which is fine while the new items look like the old).
- remove: items get a tombstone in the metadata; index types that can delete (flat, IVF) also
  drop the vectors, the others (HNSW) keep them until ``compact`` and searches skip them.
- compact: rebuilds the index and the metadata from the live items' stored vectors.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.assemble import (
    IDS,
    INDEX_FILE,
    METADATA,
    VECTORS,
    IndexInfo,
    measure_recall,
    read_info,
    write_version,
)
from indexer.build import STRIDE, ShardEncoder, list_records, skipped_summary
from indexer.bundle import read_manifest
from indexer.encoder import Encoder
from indexer.errors import CollectionError
from indexer.faiss_index import (
    add_vectors,
    load_index,
    remove_ids,
    save_index,
    supports_remove,
)
from indexer.metadata import MetadataStore
from indexer.spec_index import BuildSpec
from indexer.versions import current_dir, publish, staging


def _copy_live(root: Path, collection: str, staged: Path) -> IndexInfo:
    """Copy the live version into ``staged``; returns its index.json."""
    live = current_dir(root, collection)
    shutil.copytree(live, staged, dirs_exist_ok=True)
    return read_info(live)


def _publish_with(root: Path, collection: str, staged: Path, keep: int, info: IndexInfo) -> int:
    info.write(staged)
    return publish(root, collection, staged, keep)


def add_to_collection(spec: BuildSpec) -> int:
    """Embed ``spec.corpus`` and add it to the live version; returns the new version."""
    manifest = read_manifest(spec.bundle)
    with staging(spec.root, spec.collection) as staged:
        info = _copy_live(spec.root, spec.collection, staged)
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
        with MetadataStore.open(staged / METADATA, readonly=False) as store:
            first = store.max_id() // STRIDE[spec.kind] + 1
            numbered = [(first + i, record) for i, record in enumerate(records)]
            # Verified just above by read_manifest.
            encoder = Encoder(spec.bundle, batch_size=spec.batch_size, verify=False)
            bar = tqdm(total=len(numbered), desc=f"adding to {spec.collection}", unit="item")
            with bar, ShardEncoder(spec, encoder) as shards:
                shard = shards.encode(numbered, bar)
            store.add(shard.items)
            ids = np.concatenate([np.load(staged / IDS), shard.ids])
            vectors = np.concatenate([np.load(staged / VECTORS), shard.vectors])
            index = load_index(staged / INDEX_FILE)
            add_vectors(index, shard.vectors, shard.ids)
            save_index(index, staged / INDEX_FILE)
            np.save(staged / IDS, ids)
            np.save(staged / VECTORS, vectors)
            live = store.live_count()
        skipped = Counter(info.skipped)
        skipped.update(skipped_summary([shard], listing_skipped))
        updated = info.model_copy(
            update={
                "count": len(ids),
                "live": live,
                "recall_at_10": measure_recall(index, ids, vectors),
                "skipped": dict(skipped),
            }
        )
        return _publish_with(spec.root, spec.collection, staged, spec.keep_versions, updated)


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
    with staging(root, collection) as staged:
        info = _copy_live(root, collection, staged)
        with MetadataStore.open(staged / METADATA, readonly=False) as store:
            doomed = np.asarray(list(ids), dtype=np.int64)
            if filters:
                doomed = np.union1d(doomed, store.ids_matching(filters))
            removed = store.remove([int(i) for i in doomed])
            live = store.live_count()
        index = load_index(staged / INDEX_FILE)
        if supports_remove(index):
            remove_ids(index, doomed)
            save_index(index, staged / INDEX_FILE)
        updated = info.model_copy(update={"live": live})
        return _publish_with(root, collection, staged, keep_versions, updated), removed


def compact_collection(root: Path, collection: str, *, keep_versions: int = 3) -> int:
    """Rebuild the index and metadata from the live items only; returns the new version."""
    live_dir = current_dir(root, collection)
    info = read_info(live_dir)
    with staging(root, collection) as staged:
        with MetadataStore.open(live_dir / METADATA, readonly=True) as old:
            removed = old.removed_ids()
            items = list(old.iter_items())
        ids = np.load(live_dir / IDS)
        vectors = np.load(live_dir / VECTORS)
        keep = ~np.isin(ids, removed)
        write_version(staged, ids[keep], vectors[keep], items, info.factory, info)
        return publish(root, collection, staged, keep_versions)
