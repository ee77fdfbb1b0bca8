"""Near-duplicates in a collection: groups of live items whose vectors are almost the same.

``live image/video ids (filter on kind, minus the delete set) -> their stored vectors, segment
by segment, unit length again -> IndexFlatIP -> range search, a chunk of queries at a time
(inner product >= min_score) -> union-find over the pairs -> groups``

Only whole media count (``image`` and ``video`` items): a caption or a video's moment is a
part of one, and two moments of one video are alike by nature. The search is exact (a flat
index over the stored copies, float16 for compressed indexes, so a score is within ~1e-3 of
the served one). Memory is the vectors once (in the flat index) plus one chunk's results: the
chunk holds as many queries as keep ``chunk`` x live items under :data:`RESULTS_PER_CHUNK`
candidate pairs, however low ``min_score`` is. Each group is sorted by id and lists each
member's score to its first (lowest id) item; groups come largest first, then by first id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Final

import faiss
import numpy as np
from pydantic import BaseModel, Field

from indexer.collection import Collection

MEDIA_KINDS: Final = ("image", "video")
# Upper bound on candidate pairs one range-search chunk may return (x 12 bytes: ~200 MB).
RESULTS_PER_CHUNK: Final = 16_000_000
MAX_CHUNK: Final = 4096
MIN_SCORE_FLOOR: Final = 0.5  # below this "duplicate" means little, and groups swallow all


class DuplicateItem(BaseModel):
    id: int
    score: float = Field(description="inner product with the group's first item (1: the same)")
    uri: str


class DuplicateGroup(BaseModel):
    items: list[DuplicateItem] = Field(description="by id; the first is the group's reference")


class DuplicateReport(BaseModel):
    collection: str
    version: int
    min_score: float
    checked: int = Field(description="live image and video items compared")
    groups: list[DuplicateGroup] = Field(description="largest first, then by first id")


def media_vectors(collection: Collection) -> tuple[np.ndarray, faiss.IndexFlatIP]:
    """(ids ascending, a flat inner-product index over their unit vectors) of the live image
    and video items, filled segment by segment (one segment's float32 copy at a time)."""
    wanted = collection.ids_matching({"kind": {"in": list(MEDIA_KINDS)}})
    index = faiss.IndexFlatIP(collection.info.dim)
    parts = []
    for segment in collection.segments.segments:
        mine = wanted[segment.holds(wanted)] if len(wanted) else wanted
        if not len(mine):
            continue
        vectors = np.ascontiguousarray(segment.lookup(mine))
        faiss.normalize_L2(vectors)  # float16 copies are not quite unit length
        index.add(vectors)
        parts.append(mine)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    # Segments hold ascending, disjoint id ranges, ordered by first id: ids stay ascending.
    return ids, index


def close_pairs(
    index: faiss.IndexFlatIP, min_score: float, chunk: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(rows a, rows b) with a < b and inner product >= ``min_score``, chunk by chunk."""
    n = index.ntotal
    if chunk is None:
        chunk = max(1, min(MAX_CHUNK, RESULTS_PER_CHUNK // max(n, 1)))
    # FAISS keeps inner products strictly above the radius: one float32 step below
    # min_score keeps the ones equal to it; the exact comparison follows.
    radius = float(np.nextafter(np.float32(min_score), np.float32(-np.inf)))
    for start in range(0, n, chunk):
        xq = index.reconstruct_n(start, min(chunk, n - start))
        lims, scores, found = index.range_search(xq, radius)  # FAISS's lims, D, I
        rows = np.repeat(np.arange(start, start + len(xq)), np.diff(lims.astype(np.int64)))
        keep = (rows < found) & (scores.astype(np.float64) >= min_score)
        yield rows[keep], found[keep]


def union_groups(n: int, pairs: Iterator[tuple[np.ndarray, np.ndarray]]) -> list[list[int]]:
    """Connected rows (groups of two or more) of the pairs, each ascending; largest group
    first, then by first row."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = int(parent[i])
        return i

    for left, right in pairs:
        for a, b in zip(left.tolist(), right.tolist(), strict=True):
            ra, rb = root(a), root(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)  # the lowest row is the root
    # Every row straight to its root, by pointer jumping over the whole array at once.
    while True:
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            break
        parent = jumped
    roots, counts = np.unique(parent, return_counts=True)
    grouped = roots[counts > 1]
    rows = np.flatnonzero(np.isin(parent, grouped))  # ascending
    groups: dict[int, list[int]] = {}
    for row, at in zip(rows.tolist(), parent[rows].tolist(), strict=True):
        groups.setdefault(at, []).append(row)
    return sorted(groups.values(), key=lambda group: (-len(group), group[0]))


def find_duplicates(collection: Collection, min_score: float) -> DuplicateReport:
    """The near-duplicate groups of ``collection``'s live version."""
    if not MIN_SCORE_FLOOR <= min_score <= 1.0:
        raise ValueError(f"min_score must be in [{MIN_SCORE_FLOOR}, 1], got {min_score}")
    ids, index = media_vectors(collection)
    rows = union_groups(index.ntotal, close_pairs(index, min_score))
    uris = collection.get(ids[[row for group in rows for row in group]]) if rows else []
    by_id = {item.id: item.uri for item in uris if item is not None}
    groups = []
    for group in rows:
        vectors = index.reconstruct_batch(np.asarray(group, dtype=np.int64))
        scores = vectors @ vectors[0]
        items = [
            DuplicateItem(id=int(ids[row]), score=round(float(score), 6), uri=by_id[int(ids[row])])
            for row, score in zip(group, scores, strict=True)
        ]
        groups.append(DuplicateGroup(items=items))
    return DuplicateReport(
        collection=collection.info.collection,
        version=collection.version,
        min_score=min_score,
        checked=len(ids),
        groups=groups,
    )


def duplicates_in(root: Path, name: str, min_score: float) -> DuplicateReport:
    """:func:`find_duplicates` over the live version of collection ``name`` under ``root``
    (no FAISS index loaded: only the stored vectors and metadata are read)."""
    with Collection.open(root, name, with_indexes=False) as collection:
        return find_duplicates(collection, min_score)
