"""Exact rescoring of a compressed index's candidates, and the top-k rule every merge follows.

A segment whose codes are lossy (IVF-PQ, SQ8, PQ: see ``segments.rescores``) still stores its
vectors, as float16, in ``vectors.npy``, memory-mapped. Its search fetches ``k x r`` candidates
from the compressed codes and ranks them again by their exact inner product with the query:

``queries [Q, d] -> compressed index: k·r candidates [Q, k·r] -> their distinct ids -> stored
fp16 rows through the memory map, as float32 [u, d] -> q · v per candidate, float32 -> top k by
that score, ties by id``

Only the candidates' rows are read (page cache, not the index's RAM budget), so the cost is
``Q·k·r`` dot products and as many row reads; FAISS's ``IndexRefineFlat`` does the same from a
float32 copy it keeps in RAM, which is what a memory budget rules out. The scores returned are
the exact ones, so segments rescored this way, exact segments and the tail merge on one scale.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import numpy as np

# Candidates scored per block: two float32 [block, d] temporaries of ~16 MiB at d = 256.
_BLOCK_FLOATS: Final = 1 << 22


def check_rescore(rescore: int) -> int:
    """``rescore`` as a positive int, or ValueError naming it."""
    if isinstance(rescore, bool) or not isinstance(rescore, int | np.integer) or rescore < 1:
        raise ValueError(f"rescore must be a positive integer (1: no rescoring), not {rescore!r}")
    return int(rescore)


def best_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` best (score descending, then id ascending: deterministic wherever the
    rows come from), padded with -inf / -1 to ``k`` columns."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64)
    if scores.shape[1] < k:
        pad = k - scores.shape[1]
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
    # Padding (-inf) sorts after every result; np.lexsort's last key is the primary one.
    order = np.lexsort((ids, -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)


def exact_scores(
    queries: np.ndarray, ids: np.ndarray, lookup: Callable[[np.ndarray], np.ndarray]
) -> np.ndarray:
    """float32 [Q, m]: the inner product of each query with the stored vector of each of its
    candidate ``ids`` [Q, m] (-1: none, scored -inf); ``lookup(ids ascending) -> float32
    [n, d]`` reads the stored copies."""
    scores = np.full(ids.shape, -np.inf, dtype=np.float32)
    valid = ids >= 0
    if not valid.any():
        return scores
    distinct, inverse = np.unique(ids[valid], return_inverse=True)
    vectors = np.asarray(lookup(distinct), dtype=np.float32)
    rows = np.nonzero(valid)[0]  # the query of each valid candidate, row-major like ids[valid]
    exact = np.empty(len(rows), dtype=np.float32)
    block = max(1, _BLOCK_FLOATS // max(vectors.shape[1], 1))
    for start in range(0, len(rows), block):
        part = slice(start, start + block)
        exact[part] = np.einsum("nd,nd->n", queries[rows[part]], vectors[inverse[part]])
    scores[valid] = exact
    return scores


def rescore_top_k(
    queries: np.ndarray,
    ids: np.ndarray,
    lookup: Callable[[np.ndarray], np.ndarray],
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of candidate ``ids`` [Q, m] by exact score (:func:`exact_scores`):
    (scores float32 [Q, k], ids int64 [Q, k])."""
    return best_k(exact_scores(queries, ids, lookup), ids, k)
