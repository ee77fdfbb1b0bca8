"""``cots index compact``: merge segments and drop tombstones, as a policy says.

``live version -> plan (runs of neighbouring segments) -> one merged segment per run -> a new
version naming the untouched segments and the merged ones, the run's tombstones dropped``

The plan (:class:`CompactionPolicy`, defaults in brackets):

1. Every segment whose share of tombstoned ids is at least ``tombstone_ratio`` [0.2] is
   rewritten without them.
2. When the version has more than ``max_segments`` [10] segments, the newest segments that are
   each smaller than ``small_ratio`` [0.1] of the largest are merged: adds make small segments
   at the end of the id range, so they pile up there, and merging that tail keeps each merge's
   cost in proportion to what was added since the last one (a size-tiered policy: merged tails
   grow until they too are the large ones).
3. ``full`` merges everything into one segment (what a format-1 version needs to become one of
   segments).

Selected segments that are neighbours form a run; a run becomes one segment, indexed with what
``choose_factory`` picks for its live count: `Flat` below 50,000 vectors, else IVF with its
centroids trained anew on the merged vectors. The stored vectors are the source, so nothing is
re-encoded. Compaction publishes a version like any change, re-applied to whatever is live
then (an add that published meanwhile is kept), so readers never see a half state; one killed
before it publishes leaves the old version live and can simply run again (same vectors, same
seeded training: the same content).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from indexer.collection import Collection
from indexer.errors import CollectionError
from indexer.faiss_choice import choose_factory
from indexer.index_bundle import FORMAT_VERSION, SEGMENTS, IndexInfo
from indexer.segments import (
    SegmentInfo,
    index_fields,
    new_segment_id,
    read_segment_info,
    write_segment,
)
from indexer.update import commit
from indexer.versions import current_version, segments_dir, staging

_CHANGED = (
    "collection {collection!r} changed under the compaction (another compaction published "
    "first); nothing was changed: run it again"
)


class CompactionPolicy(BaseModel):
    """When ``cots index compact`` (and the compaction job) merges segments."""

    model_config = ConfigDict(extra="forbid")

    tombstone_ratio: float = Field(0.2, gt=0, le=1)
    max_segments: int = Field(10, ge=1)
    small_ratio: float = Field(0.1, gt=0, le=1)
    full: bool = False


def plan(
    counts: Sequence[int], tombstones: Sequence[int], policy: CompactionPolicy
) -> list[list[int]]:
    """Runs of neighbouring segment positions to merge (each run -> one segment); empty when
    the policy finds nothing to do."""
    n = len(counts)
    if policy.full:
        return [list(range(n))] if n > 1 or any(tombstones) else []
    chosen = {
        i for i in range(n) if counts[i] and tombstones[i] / counts[i] >= policy.tombstone_ratio
    }
    if n > policy.max_segments:
        small = policy.small_ratio * max(counts)
        tail = n
        while tail > 0 and counts[tail - 1] < small:
            tail -= 1
        if n - tail >= 2:
            chosen.update(range(tail, n))
    runs: list[list[int]] = []
    for i in sorted(chosen):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def compact_collection(
    root: Path,
    collection: str,
    *,
    keep_versions: int = 3,
    policy: CompactionPolicy | None = None,
) -> int | None:
    """Compact the live version as ``policy`` says; returns the new version, or None when
    there was nothing to do. A format-1 version is always rewritten whole."""
    with Collection.open(root, collection, with_indexes=False) as live:
        info = live.info
        segments = live.segments.segments
        deleted = live.segments.deleted
        policy = policy or CompactionPolicy()
        if info.format_version < FORMAT_VERSION:
            policy = policy.model_copy(update={"full": True})
        counts = [s.info.count for s in segments]
        dead = [live.segments.tombstones_of(i) for i in range(len(segments))]
        runs = plan(counts, dead, policy)
        if not runs and info.format_version == FORMAT_VERSION:
            return None
        if not runs:  # an empty format-1 version: rewrite it anyway
            runs = [list(range(len(segments)))]
        merged = [segments[j] for run in runs for j in run]
        replaced = {s.id for s in merged}
        dropped = np.intersect1d(deleted, np.concatenate([s.ids for s in merged]))
        before = sum(s.info.count for s in merged)
        max_id = max([info.max_id, *(s.info.last_id for s in segments)])
        version, format_version = live.version, info.format_version
        with staging(root, collection) as staged:
            written: list[SegmentInfo] = []
            for run in runs:
                ids, vectors, items = live.segments.live_rows(run)
                if len(ids):
                    folder = staged / SEGMENTS / new_segment_id()
                    factory = choose_factory(len(ids), info.dim)
                    fields = index_fields(info.build)
                    written.append(write_segment(folder, ids, vectors, items, factory, fields))

            def rebase(now: IndexInfo, now_deleted: np.ndarray) -> tuple[IndexInfo, np.ndarray]:
                if format_version < FORMAT_VERSION:
                    if current_version(root, collection) != version:
                        raise CollectionError(_CHANGED.format(collection=collection))
                elif not replaced <= set(now.segments):
                    raise CollectionError(_CHANGED.format(collection=collection))
                kept = [name for name in now.segments if name not in replaced]
                recalls = [read_segment_info(segments_dir(root, collection) / n) for n in kept]
                changed = now.model_copy(
                    update={
                        "format_version": FORMAT_VERSION,
                        "segments": kept + [w.id for w in written],
                        "count": now.count - before + sum(w.count for w in written),
                        "recall_at_10": min(
                            [r.recall_at_10 for r in recalls] + [w.recall_at_10 for w in written],
                            default=1.0,
                        ),
                        "max_id": max(now.max_id, max_id),
                    }
                )
                return changed, np.setdiff1d(now_deleted, dropped)

            return commit(root, collection, staged, keep_versions, rebase, format_1=True)
