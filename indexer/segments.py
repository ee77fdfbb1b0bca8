"""Immutable segments, and search across the segments of a version with a delete set.

A segment folder holds one FAISS index over its vectors, ``ids.npy`` (ascending int64),
``vectors.npy`` (float16 where the index does not keep exact floats, float32 where it does:
the stored copy feeds compaction and exact completion of filtered searches), its items in
``metadata.sqlite`` and ``segment.json``. Nothing in it changes after it is written: an add
writes a new segment, a remove a new delete set (tombstones by id), a compaction merged
segments. So a new version can list the segments of the old one without copying them.

Segments are ordered by their first id (ids grow with each add; compaction merges
neighbours):

``queries [Q, d] -> per segment: one FAISS call -> drop tombstoned ids -> merge into top k``

A segment with few tombstones is asked for ``k + tombstones`` and the deleted ids dropped
after (what it returns beyond them is its true top k); one with many is searched with an ID
selector that skips them (built once per opened version), so a heavily deleted segment never
makes a query fetch thousands. A filter becomes each segment's matching ids minus the deleted
ones with a bitmap selector over them, kept per opened version and filter
(``indexer.allowed``: the SQL runs on the first query with that filter only); a segment
none of whose items match is skipped, one with few is searched exactly over them
(``faiss_search.search`` also completes short rows exhaustively). Hits are
hydrated per segment: one metadata query for each segment the batch's ids fall in.

A segment whose codes are coarser than its stored fp16 copy (PQ, SQ8: ``rescores``) is asked
for ``k x rescore`` candidates, ranked again by their exact scores against its stored vectors
(``indexer.rescore``) after the tombstones or the filter dropped what they drop; segments merge
by score, ties by id (:func:`merge_top_k`). Served segments are memory-mapped
(``Segment(mmap=True)``): the index's codes, ``ids.npy`` and ``vectors.npy`` live in the page
cache, shared by the replicas of a host.
"""

from __future__ import annotations

import json
import mmap
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict

from indexer.allowed import AllowedIds, FilterCache
from indexer.digests import FileDigest, file_digest
from indexer.faiss_index import build_index, check_queries, is_gpu_index, load_index, save_index
from indexer.faiss_search import exact_search, filter_params, recall_at_k, search, search_checked
from indexer.filters import Filter, as_filter
from indexer.metadata import Item, MetadataStore
from indexer.rescore import best_k, check_rescore, rescore_top_k
from indexer.tail import Tail, TailPart, assign_lists, is_flat, ivf_base

SEGMENT_JSON: Final = "segment.json"
SEGMENT_INDEX: Final = "index.faiss"
SEGMENT_IDS: Final = "ids.npy"
SEGMENT_VECTORS: Final = "vectors.npy"
SEGMENT_METADATA: Final = "metadata.sqlite"
# Up to this many tombstones a segment is over-fetched (k + tombstones) and the deleted ids
# dropped; beyond, its search skips them with an ID selector (built once per opened version).
OVERFETCH_TOMBSTONES: Final = 256
# Up to this many matching ids, a filtered search of a segment whose codes are its float32
# vectors is exact over them: 4,096 x 256 floats is a fraction of a millisecond.
EXACT_FILTER_IDS: Final = 4096
RECALL_QUERIES: Final = 200
GPU_MAX_K: Final = 2048
"""The largest k FAISS's GPU indexes take: rescoring fetches at most this many there."""
DEFAULT_RESCORE: Final = 4
"""Candidates per result a lossy segment of up to ``RESCORE_STEPS[0]``'s count rescores exactly
(larger segments: ``RESCORE_STEPS``). The smallest factor whose recall@10 reaches 0.95 for both
PQ factories ``choose_factory`` picks at 100k x 256 (IVF1264,PQ32: 0.668 at r = 1, 0.878 at 2,
0.966 at 4; IVF1264,PQ64: 0.806, 0.972, 0.994; ``python -m benchmarks.index_rescore``).
1: the codes' scores as they are."""
RESCORE_STEPS: Final = ((200_000, DEFAULT_RESCORE), (2_000_000, 16), (None, 32))
"""(segments of up to this many vectors, their default factor): the denser a collection, the
closer each vector's neighbours and the longer the list rescoring must read to hold them.
Measured with IVF-PQ32 at nprobe 64 (docs/bench/scale.md): 1M reaches 0.982 at r = 16 (0.947 at
8), 10M 0.959 at r = 32 (0.910 at 16)."""


def default_rescore(count: int) -> int:
    """The measured rescoring factor for a lossy segment of ``count`` vectors."""
    for most, factor in RESCORE_STEPS:
        if most is None or count <= most:
            return factor
    raise AssertionError("RESCORE_STEPS ends with an open step")


@dataclass(frozen=True)
class Hit:
    id: int
    score: float
    item: Item


class SegmentInfo(BaseModel):
    """``segment.json``: what a segment holds."""

    model_config = ConfigDict(extra="forbid")

    id: str
    count: int
    first_id: int  # -1 for an empty segment
    last_id: int
    dim: int
    factory: str
    vectors_dtype: Literal["float32", "float16"]
    recall_at_10: float  # against exact search, on up to 200 of its own vectors
    created: str
    # Its other files' digests, taken as they were written (``indexer.digests``); empty for
    # segments written before checksums.
    files: dict[str, FileDigest] = {}


def index_fields(build: Mapping[str, Any]) -> list[str]:
    """The metadata keys a collection indexes, from its ``index.json``'s ``build`` (the first
    build's request): every segment written later indexes the same ones."""
    return [str(key) for key in build.get("index_fields", [])]


def read_segment_info(folder: Path) -> SegmentInfo:
    return SegmentInfo.model_validate(
        json.loads((folder / SEGMENT_JSON).read_text(encoding="utf-8"))
    )


def new_segment_id() -> str:
    """Unique across collections and machines: replicas key what they hold by it."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{secrets.token_hex(6)}"


def keeps_exact_floats(factory: str) -> bool:
    """Whether the index's codes are the float32 vectors themselves (flat storage): then the
    stored copy stays float32, as search and recall use it; else float16 halves the file."""
    encoding = factory.split(",")[-1]
    return encoding == "Flat" or (factory.startswith("HNSW") and "," not in factory)


def rescores(factory: str) -> bool:
    """Whether ``factory``'s segments rescore candidates with their stored fp16 vectors: lossy
    codes coarser than that copy (PQ, SQ8, SQ4, SQbf16). ``SQfp16`` codes are as fine as the
    copy (its residuals in fp16): rescoring them kept recall@10 at 0.997 against 0.998 and cost
    a third of the QPS at 100k x 256, so they keep their own scores."""
    return not keeps_exact_floats(factory) and factory.split(",")[-1] != "SQfp16"


def write_segment(
    folder: Path,
    ids: np.ndarray,
    vectors: np.ndarray,
    items: Sequence[Item],
    factory: str,
    index_fields: Sequence[str] = (),
) -> SegmentInfo:
    """Index ``vectors`` [n, d] with ``ids`` and write a complete segment into ``folder`` (new,
    empty). ``items`` are the ids' metadata rows; ``index_fields`` the metadata keys its
    SQLite indexes for filters."""
    order = np.argsort(ids, kind="stable")
    ids = np.asarray(ids, dtype=np.int64)[order]
    vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)[order])
    if len(np.unique(ids)) != len(ids):
        raise ValueError("a segment's ids must be distinct")
    if sorted(item.id for item in items) != ids.tolist():
        raise ValueError("a segment's items must be exactly its ids' rows")
    folder.mkdir(parents=True, exist_ok=False)
    recall = 1.0
    if len(ids):
        index = build_index(vectors, ids, factory)
        recall = measure_recall(index, ids, vectors)
        save_index(index, folder / SEGMENT_INDEX)
    dtype: Literal["float32", "float16"] = "float32" if keeps_exact_floats(factory) else "float16"
    np.save(folder / SEGMENT_IDS, ids)
    np.save(folder / SEGMENT_VECTORS, vectors.astype(dtype))
    with MetadataStore.create(folder / SEGMENT_METADATA, index_fields) as store:
        store.add(list(items))
    files = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()}
    info = SegmentInfo(
        id=folder.name,
        count=len(ids),
        first_id=int(ids[0]) if len(ids) else -1,
        last_id=int(ids[-1]) if len(ids) else -1,
        dim=vectors.shape[1],
        factory=factory,
        vectors_dtype=dtype,
        recall_at_10=recall,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        files=files,
    )
    (folder / SEGMENT_JSON).write_text(info.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return info


def measure_recall(index: Any, ids: np.ndarray, vectors: np.ndarray) -> float:
    """Recall@10 against exact search, with a seeded sample of the segment's own vectors as
    queries (what segment.json and index.json record)."""
    rng = np.random.default_rng(0)
    sample = rng.choice(len(ids), size=min(RECALL_QUERIES, len(ids)), replace=False)
    return recall_at_k(index, vectors, ids, vectors[sample], k=10)


class Segment:
    """One opened segment: its index and ids in RAM (``mmap``: mapped from their files,
    read-only), memory-mapped vectors, metadata read-only."""

    def __init__(
        self,
        folder: Path,
        info: SegmentInfo | None = None,
        *,
        with_index: bool = True,
        mmap: bool = False,
    ) -> None:
        self.folder = folder
        self.info = info or read_segment_info(folder)
        self.mmap = mmap
        # (numpy cannot map an empty array.)
        mode: Literal["r"] | None = "r" if mmap and self.info.count else None
        self.ids: np.ndarray = np.load(folder / SEGMENT_IDS, mmap_mode=mode)
        # Shared by the versions a replica serves at once (a swap reuses what it holds).
        self.users = 1
        # Without the index (a change that reads metadata only), searching it finds nothing.
        self.index: faiss.Index | None = (
            load_index(folder / SEGMENT_INDEX, mmap=mmap)
            if self.info.count and with_index
            else None
        )
        self.store = MetadataStore.open(folder / SEGMENT_METADATA, readonly=True)
        self._vectors: np.ndarray | None = None
        # base segment id -> the inverted list of each vector under that base's centroids
        self._lists: dict[str, np.ndarray] = {}

    @classmethod
    def of_format_1(
        cls,
        folder: Path,
        dim: int,
        factory: str,
        recall: float,
        *,
        with_index: bool = True,
        mmap: bool = False,
    ) -> Segment:
        """A version folder written before segments, read as its one segment (same file
        names; its tombstones are in its metadata, see ``MetadataStore.removed_ids``)."""
        ids = np.load(folder / SEGMENT_IDS, mmap_mode="r")
        info = SegmentInfo(
            id=f"format-1-{folder.parent.parent.name}-{folder.name}",
            count=len(ids),
            first_id=int(ids[0]) if len(ids) else -1,
            last_id=int(ids[-1]) if len(ids) else -1,
            dim=dim,
            factory=factory,
            vectors_dtype="float32",
            recall_at_10=recall,
            created="",
        )
        return cls(folder, info, with_index=with_index, mmap=mmap)

    @property
    def id(self) -> str:
        return self.info.id

    def vectors(self) -> np.ndarray:
        """The stored vectors in id order (memory-mapped; float16 or float32)."""
        if self._vectors is None:
            self._vectors = np.load(self.folder / SEGMENT_VECTORS, mmap_mode="r")
            # Rescoring reads scattered rows: with the default read-around every fault reads
            # ~128 KB about its row, which under a memory cap evicts the hot pages (10M x 256
            # in 2 GB: 1.33 s a query against 69 ms with MADV_RANDOM, docs/bench/scale.md).
            mapping = getattr(self._vectors, "_mmap", None)
            if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
                mapping.madvise(mmap.MADV_RANDOM)
        return self._vectors

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """float32 vectors of ``ids`` (all of them in this segment)."""
        rows = np.searchsorted(self.ids, ids)
        return np.asarray(self.vectors()[rows], dtype=np.float32)

    def holds(self, ids: np.ndarray) -> np.ndarray:
        """Which of ``ids`` (int64) are this segment's."""
        rows = np.minimum(np.searchsorted(self.ids, ids), max(len(self.ids) - 1, 0))
        return (self.ids[rows] == ids) if len(self.ids) else np.zeros(len(ids), dtype=bool)

    def lists_on(self, base: Segment, ivf: faiss.IndexIVF) -> np.ndarray:
        """The list of each of this segment's vectors (id order) under ``base``'s centroids,
        computed once per base: a replica's swap then assigns only the new segments."""
        lists = self._lists.get(base.id)
        if lists is None:
            lists = assign_lists(ivf, np.asarray(self.vectors(), dtype=np.float32))
            # Only the newest base's lists are kept: an older base left with a compaction.
            self._lists = {base.id: lists}
        return lists

    def close(self) -> None:
        """Release one user; the last closes the metadata store."""
        self.users -= 1
        if self.users <= 0:
            self.store.close()


@dataclass
class _Live:
    """A segment seen through a version's delete set."""

    segment: Segment
    deleted: np.ndarray  # this segment's tombstoned ids, ascending
    live_ids: np.ndarray | None = None  # built on first need (exhaustive completion)
    excluding: Any = None  # (IDSelectorNot, the IDSelectorBatch it wraps), built on first need
    in_tail: bool = False  # its live vectors are in the version's tail (unfiltered searches)

    def live(self) -> np.ndarray:
        if self.live_ids is None:
            self.live_ids = np.setdiff1d(self.segment.ids, self.deleted, assume_unique=True)
        return self.live_ids

    def without_deleted(self) -> faiss.IDSelector:
        """A selector of every id but the tombstoned ones, built once per opened version (the
        batch it wraps must outlive it: FAISS keeps a bare pointer)."""
        if self.excluding is None:
            batch = faiss.IDSelectorBatch(self.deleted)
            self.excluding = (faiss.IDSelectorNot(batch), batch)
        return self.excluding[0]


class SegmentedIndex:
    """The segments of one version and its delete set: search, filters and hydration that
    answer as one index over the live items would."""

    def __init__(
        self, segments: Sequence[Segment], deleted: np.ndarray, *, rescore: int | None = None
    ) -> None:
        ordered = sorted(segments, key=lambda s: s.info.first_id)
        # Candidates per result that lossy segments rescore (None: by each segment's size,
        # ``default_rescore``).
        self.rescore = None if rescore is None else check_rescore(rescore)
        self.deleted = np.unique(np.asarray(deleted, dtype=np.int64))
        self._parts = [
            _Live(s, np.intersect1d(s.ids, self.deleted, assume_unique=True)) for s in ordered
        ]
        self.dim = ordered[0].info.dim if ordered else 0
        self._base, self._tail = self._build_tail()
        # canonical filter -> each part's allowed ids (None: none match), for this version
        self.filtered = FilterCache()

    def _build_tail(self) -> tuple[_Live | None, Tail | None]:
        """The largest CPU IVF segment and a tail of the live vectors of the ``Flat`` ones
        (see ``indexer/tail.py``); (None, None) when there is no such base or nothing to put
        in its tail."""
        bases = [p for p in self._parts if ivf_base(p.segment.index) is not None]
        if not bases:
            return None, None
        base = max(bases, key=lambda p: p.segment.info.count)
        ivf = ivf_base(base.segment.index)
        assert ivf is not None
        parts = []
        for part in self._parts:
            if not is_flat(part.segment.index) or part.segment.info.dim != ivf.d:
                continue
            segment = part.segment
            lists = segment.lists_on(base.segment, ivf)
            keep = ~np.isin(segment.ids, part.deleted, assume_unique=True)
            vectors = np.asarray(segment.vectors(), dtype=np.float32)
            parts.append(TailPart(segment.ids[keep], vectors[keep], lists[keep]))
            part.in_tail = True
        return base, (Tail(ivf, parts) if parts else None)

    @property
    def segments(self) -> list[Segment]:
        return [part.segment for part in self._parts]

    @property
    def count(self) -> int:
        """Vectors held, tombstoned ones included."""
        return sum(part.segment.info.count for part in self._parts)

    @property
    def live(self) -> int:
        return self.count - sum(len(part.deleted) for part in self._parts)

    def ids_matching(self, filters: Filter | Mapping[str, Any] | None) -> np.ndarray:
        """Live ids (ascending) that match ``filters`` (``indexer.filters``), across segments."""
        filters = as_filter(filters)
        found = [
            np.setdiff1d(p.segment.store.ids_matching(filters), p.deleted, assume_unique=True)
            for p in self._parts
        ]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def allowed(self, filters: Filter) -> list[AllowedIds | None]:
        """Each part's live ids matching ``filters`` (None where none do), from the cache of
        this version after the first query with that filter (``indexer.allowed``)."""

        def compute() -> list[AllowedIds | None]:
            found: list[AllowedIds | None] = []
            for part in self._parts:
                matching = part.segment.store.ids_matching(filters)
                ids = np.setdiff1d(matching, part.deleted, assume_unique=True)
                found.append(AllowedIds(ids, checked=True) if len(ids) else None)
            return found

        return list(self.filtered.get(json.dumps(filters.canonical(), sort_keys=True), compute))

    def nearest(
        self,
        queries: np.ndarray,
        k: int,
        *,
        filters: Filter | Mapping[str, Any] | None = None,
        rescore: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top ``k`` live (and, with ``filters``, matching) ids per query: (scores float32
        [Q, k], ids int64 [Q, k]), best first (ties: lower id first), padded with -inf and -1.

        Lossy segments return ``k x rescore`` candidates ranked again by their exact scores
        (``indexer.rescore``; None: this version's ``rescore``, else ``default_rescore`` of the
        segment's size; 1: their codes' scores)."""
        filters = as_filter(filters)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        factor = self.rescore if rescore is None else check_rescore(rescore)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._parts:  # checked once here, not once per segment
            queries = check_queries(queries, self.dim)
        rows: list[tuple[np.ndarray, np.ndarray]] = []
        # Unfiltered, the base and the tail share one quantizer pass; filtered searches go
        # segment by segment (exact on the small ones).
        coarse = None
        if self._tail is not None and filters is None and len(queries):
            coarse = self._tail.assign(queries)
        allowed = self.allowed(filters) if filters is not None else [None] * len(self._parts)
        for part, allowed_ids in zip(self._parts, allowed, strict=True):
            if coarse is not None and part.in_tail:
                continue
            if filters is not None and allowed_ids is None:
                continue  # nothing in this segment matches
            found = self._search_part(
                part, queries, k, allowed_ids, coarse if part is self._base else None, factor
            )
            if found is not None:
                rows.append(found)
        if coarse is not None and self._tail is not None and self._tail.count:
            rows.append(self._tail.search(queries, k, coarse))
        return merge_top_k(rows, len(queries), k)

    def _search_part(
        self,
        part: _Live,
        queries: np.ndarray,
        k: int,
        allowed: AllowedIds | None,
        coarse: tuple[np.ndarray, np.ndarray] | None = None,
        rescore: int | None = 1,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """One segment's top ``k`` live ids (only ``allowed`` ones, when filtered);
        ``coarse``: the base's quantizer pass for ``queries``, already made; a lossy segment
        rescores ``k x rescore`` candidates with its stored vectors."""
        segment = part.segment
        if segment.index is None:
            return None
        exact_codes = keeps_exact_floats(segment.info.factory)
        factor = 1
        if rescores(segment.info.factory):
            factor = default_rescore(segment.info.count) if rescore is None else rescore
        if allowed is not None and len(allowed) <= EXACT_FILTER_IDS and (exact_codes or factor > 1):
            # Few matches: exact over their stored vectors (the index's own codes as float32,
            # or the copy rescoring reads) costs less than scanning nprobe lists to reject
            # nearly all of them.
            vectors = segment.lookup(allowed.ids)
            return exact_search(vectors, queries, min(k, len(allowed)), ids=allowed.ids)
        fetch = k * factor
        if factor > 1 and is_gpu_index(segment.index):
            fetch = max(k, min(fetch, GPU_MAX_K))
        found = self._candidates(part, queries, fetch, allowed, coarse, need=k)
        if found is None or factor == 1:
            return found
        return rescore_top_k(queries, found[1], segment.lookup, k)

    def _candidates(
        self,
        part: _Live,
        queries: np.ndarray,
        k: int,
        allowed: AllowedIds | None,
        coarse: tuple[np.ndarray, np.ndarray] | None,
        need: int,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """The segment index's own top ``k`` live (and ``allowed``) ids, by its codes' scores;
        a row is completed exhaustively only when it holds fewer than ``need`` (what the caller
        keeps of the ``k``)."""
        segment = part.segment
        assert segment.index is not None
        if allowed is not None:
            return search(
                segment.index,
                queries,
                min(k, len(allowed)),
                allowed=allowed,
                lookup=segment.lookup,
                need=need,
            )
        if len(part.deleted) > OVERFETCH_TOMBSTONES:
            return self._search_excluding(part, queries, k, coarse, need)
        else:
            wanted = min(k + len(part.deleted), segment.info.count)
            if coarse is not None and self._tail is not None:
                scores, ids = self._tail.search_base(queries, wanted, coarse)
            else:
                scores, ids = search_checked(segment.index, queries, wanted)
            if len(part.deleted):
                dead = np.isin(ids, part.deleted)
                ids = np.where(dead, -1, ids)
                scores = np.where(dead, np.float32(-np.inf), scores)
            return scores, ids

    def _search_excluding(
        self,
        part: _Live,
        queries: np.ndarray,
        k: int,
        coarse: tuple[np.ndarray, np.ndarray] | None = None,
        need: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Many tombstones: the index's own search with a selector that skips them (the index's
        nprobe/efSearch kept; on the base, the quantizer pass ``coarse`` reused). Rows it leaves
        with fewer than ``need`` (default ``k``), as approximate filtered search can, are
        searched again over the live ids, exhaustively."""
        segment = part.segment
        assert segment.index is not None
        live = segment.info.count - len(part.deleted)
        if live <= 0:
            return None
        wanted = min(k, live)
        if is_gpu_index(segment.index):  # no selectors on the GPU: the allowed-ids path
            return search(
                segment.index,
                queries,
                wanted,
                allowed=part.live(),
                lookup=segment.lookup,
                need=need,
            )
        params = filter_params(segment.index, part.without_deleted())
        if coarse is not None and self._tail is not None:
            scores, ids = self._tail.search_base(queries, wanted, coarse, params)
        else:
            scores, ids = search_checked(segment.index, queries, wanted, params)
        short = np.count_nonzero(ids >= 0, axis=1) < min(k if need is None else need, live)
        if short.any():
            again = search(
                segment.index, queries[short], wanted, allowed=part.live(), lookup=segment.lookup
            )
            scores[short], ids[short] = again
        return scores, ids

    def hydrate(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[list[Hit]]:
        """Up to ``k`` hits per row of :meth:`nearest`'s result; one metadata
        query per segment the ids fall in."""
        return hits_of(scores, ids, self.items(np.unique(ids[ids >= 0])), k)

    def items(self, ids: np.ndarray) -> dict[int, Item]:
        """The live items of ``ids`` (unknown and tombstoned ones left out)."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[~np.isin(ids, self.deleted)]
        found: dict[int, Item] = {}
        for part in self._parts:
            mine = ids[part.segment.holds(ids)]
            if len(mine):
                items = part.segment.store.get(mine)
                found.update((int(i), item) for i, item in zip(mine, items, strict=True) if item)
        return found

    def live_rows(
        self, positions: Sequence[int] | None = None, *, items: bool = True
    ) -> tuple[np.ndarray, np.ndarray, list[Item]]:
        """(ids ascending, float32 vectors, items) of the live items of the segments at
        ``positions`` (default: all), read from their stored copies (``items=False``: no
        metadata read, an empty list)."""
        chosen = range(len(self._parts)) if positions is None else positions
        ids, vectors, rows = [], [], []
        for i in chosen:
            part = self._parts[i]
            keep = ~np.isin(part.segment.ids, part.deleted)
            ids.append(part.segment.ids[keep])
            vectors.append(np.asarray(part.segment.vectors()[keep], dtype=np.float32))
            if items:
                wanted = set(ids[-1].tolist())
                rows += [item for item in part.segment.store.iter_items() if item.id in wanted]
        if not ids:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32), []
        return np.concatenate(ids), np.concatenate(vectors), rows

    def summary(self) -> list[tuple[Segment, int]]:
        """(segment, its tombstone count), in id order."""
        return [(part.segment, len(part.deleted)) for part in self._parts]

    def tombstones_of(self, position: int) -> int:
        return len(self._parts[position].deleted)

    def close(self) -> None:
        for part in self._parts:
            part.segment.close()


def hits_of(
    scores: np.ndarray, ids: np.ndarray, items: Mapping[int, Item], k: int
) -> list[list[Hit]]:
    """Up to ``k`` hits per row of (scores, ids) [Q, n], best first as given: ids without an
    item in ``items`` (padding, removed, unknown) are left out. Segments, local shards and the
    shard router hydrate through this one rule."""
    results = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        hits = []
        for score, item_id in zip(row_scores, row_ids, strict=True):
            item = items.get(int(item_id)) if item_id >= 0 else None
            if item is not None:
                hits.append(Hit(int(item_id), float(score), item))
                if len(hits) == k:
                    break
        results.append(hits)
    return results


def merge_top_k(
    rows: Sequence[tuple[np.ndarray, np.ndarray]], count: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of each of ``count`` queries' results over all ``rows`` ((scores, ids)
    [count, any] each: segments, shards), score descending and, among equal scores, id
    ascending; padded with -inf / -1. The same inputs give the same answer in any order."""
    if not rows:
        return np.full((count, k), -np.inf, np.float32), np.full((count, k), -1, np.int64)
    scores = np.concatenate([r[0] for r in rows], axis=1)
    ids = np.concatenate([r[1] for r in rows], axis=1)
    return best_k(scores, ids, k)


_merge = merge_top_k
