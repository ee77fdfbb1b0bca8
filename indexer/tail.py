"""The small segments of a version, searched on the base segment's inverted lists.

A collection grows by small exact (``Flat``) segments beside one large IVF segment, the base.
Scanned exactly, each 1,000-vector segment costs a query about as much as a sixteenth of the
base's IVF scan at 1M items (1,000 vectors read against the ~16,000 of nprobe = 64 of 4,000
lists), so ten such segments made a search 1.5x slower than the compacted index
(``docs/bench/updates.md``). Instead, a version with a CPU IVF base puts the live vectors of its
``Flat`` segments into one in-memory ``IndexIVFFlat`` over the base's own coarse quantizer, the
tail. A query batch is assigned to its nprobe lists once and the base and the tail are both
searched with that assignment (``search_preassigned``):

``Flat segment -> (once per segment and base) the list of each vector -> per opened version:
its live vectors added to the tail on those lists``

``queries [Q, d] -> base quantizer: nprobe lists each -> base and tail, search_preassigned ->
merged by the caller``

The version then answers as one IVF index with the base's centroids over all its live items
would: approximate where the base is (the tail finds a vector only when its list is probed),
exact with nprobe = nlist. Filtered searches and versions without an IVF base do not use a
tail; each segment's own index answers them (exact for ``Flat`` segments).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from indexer.faiss_index import is_gpu_index
from indexer.faiss_search import search_checked


def ivf_base(index: faiss.Index | None) -> faiss.IndexIVF | None:
    """``index`` as a CPU IndexIVF whose quantizer a tail can share, else None."""
    if index is None or is_gpu_index(index):
        return None
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def is_flat(index: faiss.Index | None) -> bool:
    """Whether ``index`` is exact flat storage under an id map (a small segment's index)."""
    if index is None or is_gpu_index(index):
        return False
    outer = faiss.downcast_index(index)
    if not isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        return False
    return isinstance(faiss.downcast_index(outer.index), faiss.IndexFlat)


def assign_lists(base: faiss.IndexIVF, vectors: np.ndarray) -> np.ndarray:
    """The inverted list (int64 [n]) of each of ``vectors`` [n, d] under ``base``'s centroids."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if not len(vectors):
        return np.zeros(0, dtype=np.int64)
    _, lists = base.quantizer.search(vectors, 1)
    return np.asarray(lists[:, 0], dtype=np.int64)


@dataclass(frozen=True)
class TailPart:
    """What one small segment gives the tail: its live ids, their vectors and lists."""

    ids: np.ndarray  # int64 [n]
    vectors: np.ndarray  # float32 [n, d]
    lists: np.ndarray  # int64 [n]


class Tail:
    """An in-memory IVF-Flat index over ``base``'s quantizer holding the parts' vectors."""

    def __init__(self, base: faiss.IndexIVF, parts: Sequence[TailPart]) -> None:
        # The tail borrows the quantizer: holding ``base`` here keeps it alive.
        self.base = base
        self.index = faiss.IndexIVFFlat(
            base.quantizer, base.d, base.nlist, faiss.METRIC_INNER_PRODUCT
        )
        for part in parts:
            if len(part.ids):
                vectors = np.ascontiguousarray(part.vectors, dtype=np.float32)
                ids = np.ascontiguousarray(part.ids, dtype=np.int64)
                lists = np.ascontiguousarray(part.lists, dtype=np.int64)
                self.index.add_core(
                    len(ids), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists)
                )

    @property
    def count(self) -> int:
        return int(self.index.ntotal)

    def assign(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coarse scores, list numbers) [Q, nprobe] of checked ``queries``, at the base's
        current nprobe."""
        return self.base.quantizer.search(queries, int(self.base.nprobe))

    def search_base(
        self,
        queries: np.ndarray,
        k: int,
        coarse: tuple[np.ndarray, np.ndarray],
        params: faiss.SearchParameters | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The base's own top ``k`` for ``coarse`` (= ``base.search``, without a second
        quantizer pass); ``params``: a selector (with the base's nprobe) skipping tombstones.
        Scores are the base's codes' own: the caller rescores a lossy base's candidates."""
        return _preassigned(self.base, queries, k, coarse, params)

    def search(
        self, queries: np.ndarray, k: int, coarse: tuple[np.ndarray, np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The tail's top ``k`` on the lists of ``coarse``."""
        if self.index.nprobe != self.base.nprobe:  # the base's nprobe is the one to follow
            self.index.nprobe = self.base.nprobe
        return _preassigned(self.index, queries, min(k, max(self.count, 1)), coarse)


def _preassigned(
    index: faiss.IndexIVF,
    queries: np.ndarray,
    k: int,
    coarse: tuple[np.ndarray, np.ndarray],
    params: faiss.SearchParameters | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    scores, lists = coarse
    probes = int(getattr(params, "nprobe", index.nprobe))  # (IVF parameters carry nprobe)
    if lists.shape[1] != probes:  # nprobe changed since ``coarse`` was computed
        return search_checked(index, queries, k, params)
    found = np.empty((len(queries), k), dtype=np.float32)
    labels = np.empty((len(queries), k), dtype=np.int64)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    # The C++ entry point: FAISS's Python wrapper of search_preassigned refuses ``params``.
    index.search_preassigned_c(  # type: ignore[attr-defined]  # (SWIG's, not in the stubs)
        len(queries),
        faiss.swig_ptr(queries),
        k,
        faiss.swig_ptr(lists),
        faiss.swig_ptr(scores),
        faiss.swig_ptr(found),
        faiss.swig_ptr(labels),
        False,
        params,
    )
    return np.where(labels >= 0, found, np.float32(-np.inf)).astype(np.float32), labels
