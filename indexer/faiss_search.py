"""Searching FAISS indexes: exact top-k, an index's top-k (optionally restricted to allowed
ids, completing rows an approximate search left short), and recall against exact search.

Filtered search runs inside the index's own search with an ID selector and the index's
nprobe/efSearch (``filter_params``); a GPU index, which takes no selector, over-fetches and
drops ids instead. A row that still comes back short is searched again over every allowed id
(``_exhaustive``): the stored vectors when the caller can look them up, else every inverted
list (IVF), else the flat storage under HNSW.
"""

from __future__ import annotations

from collections.abc import Callable

import faiss
import numpy as np

from indexer.allowed import AllowedIds
from indexer.faiss_index import (
    check_k,
    check_vectors,
    is_gpu_index,
    make,
    native_ivf,
    to_cpu,
    unwrap,
)


def exact_search(
    vectors: np.ndarray, queries: np.ndarray, k: int, *, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product: (scores [Q, k], rows of ``vectors`` or their ``ids``),
    padded with score -inf and id -1 when there are fewer than ``k`` vectors."""
    check_k(k)
    vectors = check_vectors(vectors, "vectors")
    queries = check_vectors(queries, "queries", vectors.shape[1])
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    labels = np.full((len(queries), k), -1, dtype=np.int64)
    found = min(k, len(vectors))
    if found and len(queries):
        d, i = faiss.knn(queries, vectors, found, metric=faiss.METRIC_INNER_PRODUCT)
        scores[:, :found], labels[:, :found] = d, i
    if ids is not None:
        ids = np.asarray(ids, dtype=np.int64)
        labels = np.where(labels >= 0, ids[np.maximum(labels, 0)], -1)
    return scores, labels


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    *,
    allowed: np.ndarray | AllowedIds | None = None,
    lookup: Callable[[np.ndarray], np.ndarray] | None = None,
    need: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of ``queries`` [Q, d]: (scores float32 [Q, k], ids int64 [Q, k]), best first,
    padded with score -inf and id -1.

    ``allowed`` (int64 ids) restricts results to those ids, inside the index's own search (an
    ``IDSelectorBatch`` with the index's nprobe/efSearch). Approximate search can then come back
    short, HNSW above all: its graph walk meets few allowed nodes when the filter is selective.
    Rule: a row with fewer than min(k, len(allowed)) results is searched again exhaustively over
    the allowed ids: exact vectors from ``lookup(ids) -> [len(ids), d]`` when given, else every
    inverted list for IVF (exact for IVF-Flat, the index's own codes otherwise), else a scan of
    the flat storage under HNSW. A row still short then has fewer allowed ids in the index.
    ``need`` (default ``k``) replaces ``k`` in that rule: a caller that rescores ``k x r``
    candidates needs only ``k`` of them. An :class:`AllowedIds` brings its selector built (a
    cached filter's).
    """
    check_k(k)
    queries = check_vectors(queries, "queries", index.d)
    if allowed is None:
        scores, labels = index.search(queries, k)
        return _finish(scores, labels)
    if not isinstance(allowed, AllowedIds):
        allowed = AllowedIds(allowed)
    ids = allowed.ids
    if ids.size == 0 or len(queries) == 0:
        return _finish(*_empty(len(queries), k))
    if is_gpu_index(index):
        scores, labels = _post_filtered(index, queries, k, ids)
    else:
        params = filter_params(index, allowed.selector())
        scores, labels = index.search(queries, k, params=params)
    short = np.count_nonzero(labels >= 0, axis=1) < min(k if need is None else need, ids.size)
    if short.any():
        scores[short], labels[short] = _exhaustive(index, queries[short], k, ids, lookup)
    return _finish(scores, labels)


def search_checked(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    params: faiss.SearchParameters | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`search` without its checks and completion, for ``queries`` already checked
    (contiguous float32 [Q, d], finite) and ``k >= 1``: a caller searching many segments with
    one batch checks it once (~10 us a call saved at 256 dims). ``params``: e.g. from
    :func:`filter_params`."""
    scores, labels = index.search(queries, k, params=params)
    return _finish(scores, labels)


def _empty(count: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((count, k), -np.inf, np.float32), np.full((count, k), -1, np.int64)


def _finish(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 scores and int64 ids, with -inf where no result (FAISS writes -FLT_MAX)."""
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    return np.where(labels >= 0, scores, np.float32(-np.inf)), labels


def filter_params(index: faiss.Index, selector: faiss.IDSelector) -> faiss.SearchParameters:
    """Search parameters carrying ``selector`` and the index's own nprobe/efSearch: FAISS reads
    these from the parameters object when one is passed (defaults nprobe 1, efSearch 16)."""
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        return make(
            "SearchParametersIVF",
            sel=selector,
            nprobe=int(inner.nprobe),
            max_codes=int(inner.max_codes),
        )
    if isinstance(inner, faiss.IndexHNSW):
        return make(
            "SearchParametersHNSW",
            sel=selector,
            efSearch=int(inner.hnsw.efSearch),
            check_relative_distance=bool(getattr(inner.hnsw, "check_relative_distance", True)),
        )
    return make("SearchParameters", sel=selector)


def _post_filtered(
    index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Filter by over-fetching and dropping ids not allowed: for GPU indexes, which take no
    ID selector. Rows may come back short; ``search`` completes them."""
    fetch = int(min(max(8 * k, 256), 2048, max(index.ntotal, k)))  # 2048: the GPU's k limit
    scores, labels = index.search(queries, fetch)
    keep = np.isin(labels, allowed) & (labels >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept first, best first
    labels = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(labels, order, 1), -1)
    scores = np.take_along_axis(scores, order, 1)
    if labels.shape[1] < k:
        pad = k - labels.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        labels = np.pad(labels, ((0, 0), (0, pad)), constant_values=-1)
    return scores, labels


def _exhaustive(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray,
    lookup: Callable[[np.ndarray], np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Filtered search that visits every allowed id (see ``search``)."""
    if lookup is not None:
        vectors = np.ascontiguousarray(lookup(allowed), dtype=np.float32)
        if vectors.shape != (allowed.size, index.d):
            wanted = (allowed.size, index.d)
            raise ValueError(f"lookup returned shape {vectors.shape}, not {wanted}")
        return exact_search(vectors, queries, k, ids=allowed)
    if is_gpu_index(index):
        # A GPU index has no selector support; its CPU copy has (costly, but only on short rows).
        return _exhaustive(to_cpu(index), queries, k, allowed, None)
    selector = faiss.IDSelectorBatch(allowed)
    ivf = native_ivf(index)
    if ivf is not None:
        params = make("SearchParametersIVF", sel=selector, nprobe=int(ivf.nlist), max_codes=0)
        return index.search(queries, k, params=params)
    outer = faiss.downcast_index(index)
    inner = unwrap(index)
    if isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2) and isinstance(
        inner, faiss.IndexHNSW
    ):
        # Scan HNSW's flat storage with the selector translated to storage positions.
        storage = faiss.downcast_index(inner.storage)
        translated = make("IDSelectorTranslated", outer.id_map, selector)
        scores, rows = storage.search(queries, k, params=make("SearchParameters", sel=translated))
        id_map = faiss.rev_swig_ptr(outer.id_map.data(), outer.id_map.size())
        return scores, np.where(rows >= 0, id_map[np.maximum(rows, 0)], -1)
    if isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        # Flat codes: the filtered search already visited every allowed id.
        return index.search(queries, k, params=make("SearchParameters", sel=selector))
    raise ValueError(
        f"cannot complete a filtered search on {type(inner).__name__}: pass lookup= (the stored "
        "vectors of the allowed ids)"
    )


def recall_of(found: np.ndarray, expected: np.ndarray) -> float:
    """Mean over rows of the fraction of ``expected`` ids (-1 = none) that ``found`` has."""
    if found.shape[0] != expected.shape[0]:
        raise ValueError(f"{found.shape[0]} result rows against {expected.shape[0]} expected")
    fractions = []
    for got, want in zip(found, expected, strict=True):
        want = want[want >= 0]
        if want.size:
            fractions.append(np.isin(want, got).sum() / want.size)
    return float(np.mean(fractions)) if fractions else 1.0


def recall_at_k(
    index: faiss.Index, vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int = 10
) -> float:
    """Recall@k of ``index`` against exact search over ``vectors`` (with ``ids``): the fraction
    of each query's exact top-k that the index's top-k holds, averaged over queries."""
    _, expected = exact_search(vectors, queries, k, ids=ids)
    _, found = search(index, queries, k)
    return recall_of(found, expected)
