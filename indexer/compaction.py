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
centroids trained anew on the merged vectors. Segments cover disjoint id ranges and only
neighbours merge, so they still do. The stored vectors are the source, so nothing is
re-encoded; compaction publishes a version like any change, so readers never see a half state,
and a compaction killed before it publishes leaves the old version live and can simply run
again (same vectors, same seeded training: the same content).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from indexer.assemble import DELETED, FORMAT_VERSION
from indexer.collection import Collection
from indexer.faiss_index import choose_factory
from indexer.segments import new_segment_id, write_segment
from indexer.versions import SEGMENTS, publish, staging


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
    with Collection.open(root, collection) as live:
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
        merged_at = {run[0]: run for run in runs}
        in_runs = {i for run in runs for i in run}
        with staging(root, collection) as staged:
            names: list[str] = []
            recalls: list[float] = []
            dropped: list[np.ndarray] = []
            for i, segment in enumerate(segments):
                if i in merged_at:
                    ids, vectors, items = live.segments.live_rows(merged_at[i])
                    dropped += [segments[j].ids for j in merged_at[i]]
                    if not len(ids):
                        continue
                    segment_id = new_segment_id()
                    factory = choose_factory(len(ids), info.dim)
                    written = write_segment(
                        staged / SEGMENTS / segment_id, ids, vectors, items, factory
                    )
                    names.append(segment_id)
                    recalls.append(written.recall_at_10)
                elif i not in in_runs:
                    names.append(segment.id)
                    recalls.append(segment.info.recall_at_10)
            gone = np.concatenate(dropped) if dropped else np.zeros(0, np.int64)
            remaining = np.setdiff1d(deleted, gone)
            np.save(staged / DELETED, remaining)
            kept = [s for i, s in enumerate(segments) if i not in in_runs]
            count = sum(s.info.count for s in kept) + sum(
                segments[j].info.count - dead[j] for run in runs for j in run
            )
            changed = info.model_copy(
                update={
                    "format_version": FORMAT_VERSION,
                    "segments": names,
                    "count": count,
                    "live": count - len(remaining),
                    "tombstones": len(remaining),
                    "recall_at_10": min(recalls, default=1.0),
                    "max_id": max([info.max_id, *(s.info.last_id for s in segments)]),
                }
            )
            changed.write(staged)
            return publish(root, collection, staged, keep_versions)
