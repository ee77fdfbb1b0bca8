"""The new segment's rows of a sync (``indexer.sync``): the encoded files that are still as
the scan saw them, and the touched files' items under new ids with their stored vectors.

An encoded file is accepted when a fresh ``stat`` (and the decoder's own, recorded in the
item) equals the scan's: a file written while it was encoded is left for the next sync
("changed during sync"), one that vanished is skipped ("missing file") and its old items are
removed, one that cannot be read keeps its old items. Segments are immutable, so new
metadata means a new row: a touched file's items get new ids and its old ones are removed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from indexer.build_spec import BuildSpec
from indexer.item_ids import STRIDE, item_id
from indexer.media_scan import MediaFile
from indexer.metadata import Item
from indexer.shards import Shard
from indexer.sync_plan import Hasher, Held, SyncPlan, drift, skip_reason, source_metadata
from indexer.versions import reserve_numbers

# A touched file: (the file, its sha256, each of its old items with its stored vector).
Touched = tuple[MediaFile, str, list[tuple[Item, np.ndarray]]]


@dataclass
class Rows:
    """Items for the new segment with their vectors, and the old ids they replace."""

    ids: list[int] = field(default_factory=list)
    vectors: list[np.ndarray] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)

    def add(self, item: Item, vector: np.ndarray) -> None:
        self.ids.append(item.id)
        self.vectors.append(np.asarray(vector, dtype=np.float32))
        self.items.append(item)

    def arrays(self, dim: int) -> tuple[np.ndarray, np.ndarray, list[Item]]:
        """(ids ascending, vectors [n, dim], items) in that order."""
        order = np.argsort(np.asarray(self.ids, dtype=np.int64), kind="stable")
        ids = np.asarray(self.ids, dtype=np.int64)[order]
        vectors = np.stack(self.vectors)[order] if self.vectors else np.zeros((0, dim), np.float32)
        return ids, vectors, [self.items[i] for i in order]


def accept_encoded(
    plan: SyncPlan,
    held: dict[str, Held],
    shards: list[Shard],
    hasher: Hasher,
    rows: Rows,
    skipped: Counter[str],
) -> tuple[int, int]:
    """Move the encoded files that are still as the scan saw them into ``rows``; returns
    (added, changed). A file that vanished is skipped and its old items join ``plan.gone``."""
    found: dict[str, list[tuple[Shard, int]]] = {}
    reasons: dict[str, str] = {}
    for shard in shards:
        for row, item in enumerate(shard.items):
            found.setdefault(item.uri, []).append((shard, row))
        reasons.update(shard.skipped)
    added = changed = 0
    for file in plan.encode:
        known = held.get(file.relpath)
        mine = found.get(str(file.path), [])
        outcome = _verified_sha256(file, mine, reasons, hasher)
        if outcome.reason is not None:
            skipped[outcome.reason] += 1
            if outcome.reason == "missing file" and known is not None:
                plan.gone[file.relpath] = known
            continue
        source = source_metadata(file, outcome.sha256)
        for shard, row in mine:
            item = shard.items[row]
            rows.add(
                item.model_copy(update={"metadata": {**item.metadata, **source}}),
                shard.vectors[row],
            )
        if known is None:
            added += 1
        else:
            changed += 1
            rows.replaced += known.ids
    return added, changed


@dataclass(frozen=True)
class _Outcome:
    sha256: str = ""
    reason: str | None = None  # why the file is left out this time


def _verified_sha256(
    file: MediaFile, mine: list[tuple[Shard, int]], reasons: dict[str, str], hasher: Hasher
) -> _Outcome:
    """The SHA-256 of an encoded file still as the scan saw it (the decoder's, when it took
    one while reading the file, else hashed now), or why it is left out."""
    reason = drift(file)
    if reason is None and not mine:
        reason = _category(reasons.get(str(file.path), "not encoded"))
    if reason is not None:
        return _Outcome(reason=reason)
    shard, row = mine[0]
    meta = shard.items[row].metadata
    # The decoder's stat of the bytes it embedded, when it recorded one, must be the scan's too.
    if (
        meta.get("file_size", file.size) != file.size
        or meta.get("mtime_ns", file.mtime_ns) != file.mtime_ns
    ):
        return _Outcome(reason="changed during sync")
    recorded = meta.get("sha256")
    if isinstance(recorded, str):
        return _Outcome(sha256=recorded)
    try:
        return _Outcome(sha256=hasher(file.path))
    except OSError as error:
        return _Outcome(reason=skip_reason(error))


def _category(reason: str) -> str:
    """A shard's skip reason ("unreadable file: x: [Errno 13] Permission denied") as the
    category the report counts."""
    if "Permission denied" in reason:
        return "permission denied"
    category = reason.split(":")[0]
    # Decoding found it missing but it is back (with its scanned size and mtime): it was
    # replaced mid-sync; the next sync takes it.
    return "changed during sync" if category == "missing file" else category


def re_add_touched(
    spec: BuildSpec,
    touched: list[Touched],
    rows: Rows,
    floor: int,
) -> None:
    """The touched files' items under new ids with fresh metadata and their stored vectors
    (segments are immutable: new metadata means a new row)."""
    if not touched:
        return
    first = reserve_numbers(spec.root, spec.collection, len(touched), floor)
    stride = STRIDE[spec.kind]
    for offset, (file, sha256, old) in enumerate(touched):
        source = source_metadata(file, sha256)
        for item, vector in old:
            new_id = item_id(spec.kind, first + offset, item.id % stride)
            fresh = item.model_copy(update={"id": new_id, "metadata": {**item.metadata, **source}})
            rows.add(fresh, vector)
            rows.replaced.append(item.id)
