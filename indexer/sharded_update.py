"""Changes to a sharded collection, routed to its shards (``indexer.sharded`` has the layout).

- add: ids above the largest any shard ever gave (``max_id`` of every shard's index.json,
  reserved at the collection's own folder so that two adds at once get disjoint ranges);
  each item goes to ``shard_of(id)``. Every shard's new segment is written first, then the
  shards publish one after another (``indexer.update.commit``): a failure while writing
  publishes nothing, and a reader may see some shards' part of an add before the others'
  for the moments between their publishes.
- remove: each id to the shard that holds it; a filter to every shard.
- compact: each shard as ``indexer.compaction`` says (its own policy decision per shard; a
  merged IVF segment is trained anew on its shard's vectors, no longer the shared quantizer,
  which the merge across shards does not need: it merges exact scores).
- add from a corpus (``cots index add``): encoded as ``indexer.update.add_to_collection``
  encodes, then routed as above.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from indexer.build_spec import BuildSpec
from indexer.compaction import CompactionPolicy, compact_collection
from indexer.errors import CollectionError
from indexer.faiss_choice import choose_factory
from indexer.filters import Filter, as_filter
from indexer.index_bundle import SEGMENTS, IndexInfo, read_info
from indexer.item_ids import STRIDE, next_record_number
from indexer.metadata import Item
from indexer.segments import SegmentInfo, index_fields, new_segment_id, write_segment
from indexer.sharded import read_sharded, shard_name, shard_of, shard_root
from indexer.update import commit, joined_segment, remove_from_collection
from indexer.versions import current_dir, reserve_numbers, staging


def shard_infos(root: Path, name: str) -> list[IndexInfo]:
    """Each shard's live index.json, in shard order."""
    info = read_sharded(root, name)
    folder = shard_root(root, name)
    return [read_info(current_dir(folder, shard_name(i))) for i in range(info.shards)]


def reserve_ids(root: Path, name: str, count: int) -> int:
    """The first of ``count`` record numbers no shard ever gave and no other add took."""
    infos = shard_infos(root, name)
    kind = infos[0].kind
    floor = next_record_number(kind, max(info.max_id for info in infos))
    return reserve_numbers(root, name, count, floor)


def add_sharded(
    root: Path,
    name: str,
    vectors: np.ndarray,
    items: Sequence[Item],
    *,
    keep_versions: int = 3,
) -> np.ndarray:
    """Add ``vectors`` and their ``items`` (one record each; the items' own ids are replaced)
    with new ids; returns the ids given, in the order of ``items``."""
    if len(items) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(items)} items")
    stride = STRIDE[read_sharded(root, name).kind]
    first = reserve_ids(root, name, len(items))
    ids = (first + np.arange(len(items), dtype=np.int64)) * stride
    numbered = [item.model_copy(update={"id": int(i)}) for item, i in zip(items, ids, strict=True)]
    add_sharded_encoded(root, name, ids, vectors, numbered, keep_versions=keep_versions)
    return ids


def add_sharded_encoded(
    root: Path,
    name: str,
    ids: np.ndarray,
    vectors: np.ndarray,
    items: Sequence[Item],
    *,
    keep_versions: int = 3,
    skipped: dict[str, int] | None = None,
    removed: np.ndarray | None = None,
    skipped_is_total: bool = False,
) -> list[int | None]:
    """Route ``vectors`` with ``ids`` (from :func:`reserve_ids`'s range) and ``items`` to their
    shards, and ``removed`` ids to the shards that hold them: one new version a shard, its
    segment and its removes together (what a sync publishes); returns each shard's new version
    (None: the change gave it nothing). ``skipped`` counts what the change left out (kept by
    shard 0): added to the counts so far, or (``skipped_is_total``) replacing them."""
    info = read_sharded(root, name)
    folder = shard_root(root, name)
    ids = np.asarray(ids, dtype=np.int64)
    vectors = np.asarray(vectors, dtype=np.float32)
    if len(ids) and vectors.shape[1] != info.dim:
        raise CollectionError(
            f"vectors of dim {vectors.shape[1]} cannot join collection {name!r} of dim {info.dim}"
        )
    owners = shard_of(ids, info.shards)
    doomed = np.unique(np.asarray(removed if removed is not None else [], dtype=np.int64))
    doomed_owners = shard_of(doomed, info.shards)
    by_id = {item.id: item for item in items}
    versions: list[int | None] = [None] * info.shards
    with ExitStack() as stack:
        written: list[tuple[int, Path, SegmentInfo | None]] = []
        for i in range(info.shards):
            mine = owners == i
            counts = skipped is not None and (bool(skipped) or skipped_is_total) and i == 0
            if not mine.any() and not (doomed_owners == i).any() and not counts:
                continue
            shard = shard_name(i)
            staged = stack.enter_context(staging(folder, shard))
            segment = None
            if mine.any():
                fields = index_fields(read_info(current_dir(folder, shard)).build)
                segment = write_segment(
                    staged / SEGMENTS / new_segment_id(),
                    ids[mine],
                    vectors[mine],
                    [by_id[int(j)] for j in ids[mine]],
                    choose_factory(int(mine.sum()), info.dim),
                    fields,
                )
            written.append((i, staged, segment))
        for i, staged, segment in written:
            # What the change skipped is counted once, by shard 0.
            counted = skipped if i == 0 else None
            rebase = _joining(segment, counted, skipped_is_total, doomed[doomed_owners == i])
            versions[i] = commit(folder, shard_name(i), staged, keep_versions, rebase)
    return versions


def _joining(
    segment: SegmentInfo | None,
    skipped: dict[str, int] | None,
    total: bool,
    doomed: np.ndarray,
) -> Any:
    def rebase(live: IndexInfo, deleted: np.ndarray) -> tuple[IndexInfo, np.ndarray]:
        merged = Counter() if total and skipped is not None else Counter(live.skipped)
        merged.update(skipped or {})
        update: dict[str, Any] = {"skipped": dict(merged)}
        if segment is not None:
            update |= joined_segment(live, segment)
        return live.model_copy(update=update), np.union1d(deleted, doomed)

    return rebase


def remove_sharded(
    root: Path,
    name: str,
    *,
    ids: Sequence[int] | np.ndarray = (),
    filters: Filter | Mapping[str, Any] | None = None,
    keep_versions: int = 3,
) -> tuple[list[int | None], int]:
    """Remove items by id (each sent to the shard that holds it) and/or by filter (sent to
    every shard); returns (each shard's new version, None where it had nothing to do; items
    removed)."""
    filters = as_filter(filters)
    named = np.asarray(list(ids), dtype=np.int64)
    if not len(named) and filters is None:
        raise ValueError("name the items to remove: ids, a filter, or both")
    info = read_sharded(root, name)
    owners = shard_of(named, info.shards)
    versions: list[int | None] = [None] * info.shards
    removed = 0
    for i in range(info.shards):
        mine = named[owners == i]
        if not len(mine) and filters is None:
            continue
        versions[i], count = remove_from_collection(
            shard_root(root, name),
            shard_name(i),
            ids=mine.tolist(),
            filters=filters,
            keep_versions=keep_versions,
        )
        removed += count
    return versions, removed


def compact_sharded(
    root: Path,
    name: str,
    *,
    keep_versions: int = 3,
    policy: CompactionPolicy | None = None,
) -> list[int | None]:
    """Compact each shard as ``policy`` says; each shard's new version (None: nothing to do)."""
    info = read_sharded(root, name)
    return [
        compact_collection(
            shard_root(root, name), shard_name(i), keep_versions=keep_versions, policy=policy
        )
        for i in range(info.shards)
    ]


def add_corpus_sharded(spec: BuildSpec) -> list[int | None]:
    """``cots index add`` on a sharded collection: ``spec.corpus`` embedded as
    ``indexer.update.add_to_collection`` embeds it, then routed to the shards."""
    from indexer.shards import ShardEncoder, list_records, skipped_summary
    from runtime.bundle import read_manifest
    from runtime.encoder import Encoder

    info = read_sharded(spec.root, spec.collection)
    manifest = read_manifest(spec.bundle)
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
    first = reserve_ids(spec.root, spec.collection, len(records))
    numbered = [(first + i, record) for i, record in enumerate(records)]
    encoder = Encoder(spec.bundle, batch_size=spec.batch_size, verify=False)
    bar = tqdm(total=len(numbered), desc=f"adding to {spec.collection}", unit="item")
    with bar, ShardEncoder(spec, encoder) as shards:
        shard = shards.encode(numbered, bar)
    return add_sharded_encoded(
        spec.root,
        spec.collection,
        shard.ids,
        shard.vectors,
        shard.items,
        keep_versions=spec.keep_versions,
        skipped=skipped_summary([shard], listing_skipped),
    )
