"""The FAISS layer of the indexer: choose, build, search (optionally filtered), remove, save, load.

Vectors are L2-normalised float32 embeddings and the metric is inner product (cosine). Ids are
ours: non-negative int64, unique, never positions. Flat and HNSW indexes are wrapped in
``IndexIDMap2`` for that; IVF indexes keep the ids in their inverted lists themselves (an
``IndexIDMap`` over IVF would corrupt its id map on ``remove_ids``, which IVF does not renumber).

Every function here is torch-free and runs without a GPU; the GPU path (``use_gpu``) is taken only
when FAISS sees one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import faiss
import numpy as np

from indexer.allowed import AllowedIds
from indexer.errors import FactoryError, IndexFileError

log = logging.getLogger(__name__)

FLAT_MAX_COUNT: Final = 50_000
"""Below this many vectors exact search is fast enough (a few ms a query at dim 512)."""
HNSW_MAX_COUNT: Final = 5_000_000
"""Above this an HNSW build takes hours on a few cores; IVF trains and adds far faster."""
HNSW_M: Final = 32
HNSW_EF_CONSTRUCTION: Final = 40
HNSW_EF_SEARCH: Final = 64
NLIST_MAX: Final = 65_536
MIN_TRAIN_PER_LIST: Final = 39
"""FAISS warns below 39 training points per k-means centroid; nlist is capped so n/nlist >= 39."""
NPROBE_MAX: Final = 64
PQ_MAX_M: Final = 64
"""PQ codes of at most 64 bytes: also the largest most GPU IVF-PQ kernels take."""
NORM_TOLERANCE: Final = 1e-2
"""fp16 encoders give norms off by ~1e-3; anything further is not a normalised embedding."""

# RAM per vector of the id maps: IndexIDMap2 keeps an id vector (8 B) and a hash map back (about
# 45 B measured with glibc); IVF keeps one int64 per vector in its lists.
IDMAP2_BYTES: Final = 56
IVF_ID_BYTES: Final = 8
# HNSW: level-0 links (2·M int32), upper levels (about M/(M-1) more int32s), level and offset.
HNSW_EXTRA_BYTES: Final = 20

# Indexes loaded memory-mapped: their codes live in a read-only mapping, and FAISS would write
# into it on add/remove (a segfault, not an error). FAISS objects refuse new attributes, hence a
# set of them; weak, so it never keeps one alive.
_READ_ONLY: Final[weakref.WeakSet[faiss.Index]] = weakref.WeakSet()


def _make(name: str, *args: Any, **fields: Any) -> Any:
    """``faiss.<name>(*args, **fields)``: the stubs bundled with faiss lack the keyword
    arguments of the SearchParameters classes and some constructors' overloads."""
    return getattr(faiss, name)(*args, **fields)


# --------------------------------------------------------------------------------------------
# Choosing an index


def ivf_nlist(count: int) -> int:
    """Inverted lists for ``count`` vectors: ⌊4·√n⌋, at most n/39 (k-means needs 39 points a
    list) and 65,536, at least 1."""
    nlist = min(int(4 * math.sqrt(max(count, 0))), count // MIN_TRAIN_PER_LIST, NLIST_MAX)
    return max(1, nlist)


def pq_m_candidates(dim: int) -> list[int]:
    """PQ sub-quantizer counts to try, largest first: divisors of ``dim`` up to
    min(dim/4, 64), so a code is at most dim/4 bytes (16x smaller than float32)."""
    cap = min(max(dim // 4, 1), PQ_MAX_M)
    return [m for m in range(cap, 0, -1) if dim % m == 0]


def default_nprobe(nlist: int) -> int:
    """Lists scanned per query: nlist/8, between 1 and 64."""
    return max(1, min(nlist // 8, NPROBE_MAX))


def choose_factory(
    count: int,
    dim: int,
    memory_budget_bytes: int | None = None,
    *,
    removable: bool = True,
) -> str:
    """The FAISS factory string for ``count`` vectors of ``dim`` within a RAM budget.

    The first row that applies wins. n = count, d = dim; "fits" means ``estimate_memory_bytes``
    of that factory is at most the budget (no budget: everything fits).

    | row | when                                          | factory                     |
    |-----|-----------------------------------------------|-----------------------------|
    | 1   | n < 50,000 and it fits                        | `Flat` (exact)              |
    | 2   | not `removable`, n <= 5,000,000, it fits      | `HNSW32`                    |
    | 3   | it fits                                       | `IVF{nlist},Flat`           |
    | 4   | it fits                                       | `IVF{nlist},SQfp16` (fp16)  |
    | 5   | n >= 256 and it fits, largest m that does     | `IVF{nlist},PQ{m}`          |
    | 6   | nothing fits                                  | `ValueError`                |

    nlist = ⌊4·√n⌋ clipped to [1, min(n/39, 65,536)]. m runs over the divisors of d up to
    min(d/4, 64), largest first; a PQ code is m bytes. HNSW is only picked when the caller needs
    no ``remove_ids`` (HNSW cannot remove): a collection edited in place gets IVF.
    Searches default to nprobe = nlist/8 in [1, 64] and efSearch = 64.
    """
    if count < 0 or dim < 1:
        raise ValueError(f"count must be >= 0 and dim >= 1, not count={count}, dim={dim}")
    budget = math.inf if memory_budget_bytes is None else memory_budget_bytes

    def fits(factory: str) -> bool:
        return estimate_memory_bytes(factory, count, dim) <= budget

    if count < FLAT_MAX_COUNT and fits("Flat"):
        return "Flat"
    hnsw = f"HNSW{HNSW_M}"
    if not removable and count <= HNSW_MAX_COUNT and fits(hnsw):
        return hnsw
    nlist = ivf_nlist(count)
    for encoding in ("Flat", "SQfp16"):
        if fits(factory := f"IVF{nlist},{encoding}"):
            return factory
    if count >= 256:  # PQ's 256-centroid k-means needs at least 256 training points
        for m in pq_m_candidates(dim):
            if fits(factory := f"IVF{nlist},PQ{m}"):
                return factory
    smallest = f"IVF{nlist},PQ{pq_m_candidates(dim)[-1]}"
    raise ValueError(
        f"no index for {count:,} vectors of dim {dim} fits in {memory_budget_bytes:,} bytes "
        f"(the smallest, {smallest}, needs {estimate_memory_bytes(smallest, count, dim):,})"
    )


@dataclass(frozen=True)
class _Spec:
    """What a factory string means for memory: bytes a vector, fixed bytes, id map bytes."""

    code_bytes: float
    fixed_bytes: int
    id_bytes: int


_IVF = re.compile(r"^IVF(\d+),(.+)$")
_HNSW = re.compile(r"^HNSW(\d+)(?:,Flat)?$")
_PQ = re.compile(r"^PQ(\d+)(?:x(\d+))?$")


def _code_bytes(encoding: str, dim: int) -> float | None:
    """Bytes a vector of a flat encoding (``Flat``, ``SQfp16``, ``SQ8``, ``PQ{m}[x{bits}]``)."""
    if encoding == "Flat":
        return 4.0 * dim
    if encoding in ("SQfp16", "SQbf16"):
        return 2.0 * dim
    if encoding == "SQ8":
        return float(dim)
    if encoding == "SQ4":
        return dim / 2
    if match := _PQ.match(encoding):
        m, bits = int(match[1]), int(match[2] or 8)
        return math.ceil(m * bits / 8)
    return None


def _spec(factory: str, dim: int) -> _Spec:
    if match := _IVF.match(factory):
        nlist, encoding = int(match[1]), match[2]
        code = _code_bytes(encoding, dim)
        if code is not None:
            fixed = nlist * dim * 4  # the coarse centroids
            if encoding.startswith("PQ"):
                fixed += 256 * dim * 4  # the PQ codebooks
            return _Spec(code, fixed, IVF_ID_BYTES)
    elif match := _HNSW.match(factory):
        links = 2 * int(match[1]) * 4 + HNSW_EXTRA_BYTES
        return _Spec(4.0 * dim + links, 0, IDMAP2_BYTES)
    else:
        code = _code_bytes(factory, dim)
        if code is not None:
            return _Spec(code, 256 * dim * 4 if factory.startswith("PQ") else 0, IDMAP2_BYTES)
    raise ValueError(
        f"cannot estimate the memory of factory {factory!r}: known forms are Flat, SQfp16, SQ8, "
        "PQ{m}, HNSW{M}, IVF{nlist},Flat|SQfp16|SQ8|PQ{m}"
    )


def estimate_memory_bytes(factory: str, count: int, dim: int) -> int:
    """RAM an index of ``count`` vectors takes once built (codes, ids, centroids, links).

    An estimate within ~10 %: allocator slack and the training-time peak are not counted.
    """
    spec = _spec(factory, dim)
    return math.ceil(count * (spec.code_bytes + spec.id_bytes)) + spec.fixed_bytes


# --------------------------------------------------------------------------------------------
# Validation


def _check_vectors(x: Any, name: str, dim: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous float32 [n, dim] matrix of finite unit vectors, or ValueError."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, not {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, dim], not shape {x.shape}")
    if x.dtype != np.float32:
        raise ValueError(f"{name} must be float32, not {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} have dim {x.shape[1]}, the index has dim {dim}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have dim >= 1")
    if len(x):
        # Squared norms without a temporary the size of x; NaN and inf propagate into worst.
        worst = float(np.max(np.abs(np.einsum("ij,ij->i", x, x) - 1.0)))
        if not math.isfinite(worst):
            raise ValueError(f"{name} contain NaN or infinite values")
        if worst > 2 * NORM_TOLERANCE:  # |n² - 1| ≈ 2·|n - 1| near 1
            raise ValueError(
                f"{name} must be L2-normalised (the metric is inner product); "
                f"a squared norm is off by {worst:.3g}"
            )
    return np.ascontiguousarray(x)


def check_queries(queries: Any, dim: int) -> np.ndarray:
    """``queries`` as :func:`search` takes them (float32 [Q, dim], finite, unit norm), or
    ValueError; what :func:`search_checked` assumes."""
    return _check_vectors(queries, "queries", dim)


def _check_ids(ids: Any, count: int) -> np.ndarray:
    """``ids`` as int64 [count]: integers, non-negative (-1 pads results), unique."""
    if not isinstance(ids, np.ndarray):
        raise ValueError(f"ids must be a numpy array, not {type(ids).__name__}")
    if ids.ndim != 1 or len(ids) != count:
        raise ValueError(f"ids must be 1-D with one id a vector ({count}), not shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers, not {ids.dtype}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if count and int(ids.min()) < 0:
        raise ValueError("ids must be >= 0 (-1 marks a missing result)")
    if len(np.unique(ids)) != count:
        raise ValueError("ids must be unique")
    return ids


def _check_k(k: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}")


# --------------------------------------------------------------------------------------------
# Index structure


def _unwrap(index: faiss.Index) -> faiss.Index:
    """The index under any IndexIDMap/IndexIDMap2 wrappers, downcast to its real class."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        index = faiss.downcast_index(index.index)
    return index


def _native_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """``index`` itself as an IndexIVF when it is one (ids in its lists), else None."""
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def is_gpu_index(index: faiss.Index) -> bool:
    """Whether ``index`` lives on a GPU (where FAISS takes no ID selectors)."""
    return _is_gpu(index)


def _is_gpu(index: faiss.Index) -> bool:
    """Whether ``index`` (or what it wraps) lives on a GPU; always False with faiss-cpu."""
    gpu_base = getattr(faiss, "GpuIndex", None)
    while True:
        index = faiss.downcast_index(index)
        if gpu_base is not None and isinstance(index, gpu_base):
            return True
        if isinstance(index, faiss.IndexReplicas | faiss.IndexShards):
            shards: Any = index  # ThreadedIndex's count/at are missing from the stubs
            return bool(shards.count() > 0 and _is_gpu(shards.at(0)))
        if not isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
            return False
        index = index.index


def _want_gpu(use_gpu: bool | None) -> bool:
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and gpus == 0:
        raise ValueError("use_gpu=True but FAISS sees no GPU (is faiss-cpu installed?)")
    return gpus > 0 if use_gpu is None else use_gpu


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """``index`` on all GPUs, or itself (with a log line) for types FAISS has no GPU code for
    (HNSW, for one)."""
    options = faiss.GpuMultipleClonerOptions()
    # IVF-PQ lookup tables over 48 KiB (m = 64) only fit GPU shared memory in fp16.
    options.useFloat16 = isinstance(_unwrap(index), faiss.IndexIVFPQ)
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as error:
        log.info("%s stays on the CPU: %s", type(_unwrap(index)).__name__, error)
        return index


def to_serving_device(index: faiss.Index, use_gpu: bool | None = None) -> faiss.Index:
    """``index`` on the GPUs when ``use_gpu`` (None: when FAISS sees one), else itself."""
    return _to_gpu(index) if _want_gpu(use_gpu) else index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (for saving, removing); a CPU index is returned as it is."""
    return faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index


def new_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index for ``factory`` that takes our ids (see module doc)."""
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        detail = f"FAISS cannot build factory {factory!r} at dim {dim}: {error}"
        raise FactoryError(detail) from None
    # index_factory returns the concrete class already; a downcast_index proxy would not own
    # the index, which would be freed with this one.
    if not isinstance(index, faiss.IndexIVF | faiss.IndexIDMap | faiss.IndexIDMap2):
        index = faiss.IndexIDMap2(index)
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexHNSW):
        inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if isinstance(inner, faiss.IndexIVFPQ):
        # The factory turns on polysemous training (codes ordered for Hamming pre-filtering, an
        # L2-only search mode we never use); it is most of IVF-PQ's training time.
        ivfpq: Any = inner  # the stubs lack this field
        ivfpq.do_polysemous_training = False
    return index


def get_search_params(index: faiss.Index) -> dict[str, int]:
    """The search-time knobs of ``index``: ``nprobe``/``nlist`` for IVF, ``efSearch`` for HNSW."""
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        return {"nlist": int(inner.nlist), "nprobe": int(inner.nprobe)}
    if isinstance(inner, faiss.IndexHNSW):
        return {"efSearch": int(inner.hnsw.efSearch)}
    gpu_ivf: Any = inner  # a GpuIndexIVF, which the stubs do not describe
    if _is_gpu(index) and hasattr(gpu_ivf, "nprobe"):
        return {"nlist": int(gpu_ivf.nlist), "nprobe": int(gpu_ivf.nprobe)}
    return {}


def set_search_params(
    index: faiss.Index, *, nprobe: int | None = None, ef_search: int | None = None
) -> None:
    """Set IVF ``nprobe`` (clipped to nlist) and/or HNSW ``ef_search`` on ``index``."""
    inner = _unwrap(index)
    if nprobe is not None:
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, not {nprobe}")
        if _is_gpu(index):
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        elif isinstance(inner, faiss.IndexIVF):
            inner.nprobe = min(nprobe, inner.nlist)
        else:
            raise ValueError(f"nprobe applies to IVF indexes, not {type(inner).__name__}")
    if ef_search is not None:
        if ef_search < 1:
            raise ValueError(f"ef_search must be >= 1, not {ef_search}")
        if not isinstance(inner, faiss.IndexHNSW):
            raise ValueError(f"ef_search applies to HNSW indexes, not {type(inner).__name__}")
        inner.hnsw.efSearch = ef_search


def _set_default_search_params(index: faiss.Index) -> None:
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        set_search_params(index, nprobe=default_nprobe(int(inner.nlist)))
    elif isinstance(inner, faiss.IndexHNSW):
        set_search_params(index, ef_search=HNSW_EF_SEARCH)


# --------------------------------------------------------------------------------------------
# Building and editing


def build_index(
    vectors: np.ndarray,
    ids: np.ndarray,
    factory: str,
    *,
    train_sample: int = 100_000,
    seed: int = 0,
    use_gpu: bool | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> faiss.Index:
    """Build a ``factory`` index over ``vectors`` [n, d] float32 (L2-normalised) with ``ids``.

    Trains (when the type needs it) on a seeded random sample of ``train_sample`` vectors, raised
    to 39·nlist for IVF so k-means has enough points a list; then adds in chunks, calling
    ``on_progress(added)`` after each. Search defaults: nprobe = nlist/8 in [1, 64], efSearch 64.
    ``use_gpu=None`` uses the GPUs when FAISS sees any; the result then lives on the GPU (search
    it there; ``save_index`` copies it back).
    """
    vectors = _check_vectors(vectors, "vectors")
    ids = _check_ids(ids, len(vectors))
    dim = vectors.shape[1]
    index = new_index(factory, dim)
    _set_default_search_params(index)
    defaults = get_search_params(index)
    nlist = defaults.get("nlist", 0)
    if _want_gpu(use_gpu):
        index = _to_gpu(index)
        if _is_gpu(index) and "nprobe" in defaults:  # GPU IVF copies start at nprobe 1
            set_search_params(index, nprobe=defaults["nprobe"])
    if not index.is_trained:
        size = min(len(vectors), max(train_sample, MIN_TRAIN_PER_LIST * nlist))
        if size < max(nlist, 1):
            raise FactoryError(f"{factory} needs at least {nlist} vectors to train, got {size}")
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(len(vectors), size=size, replace=False))
        try:
            index.train(vectors[sample])
        except RuntimeError as error:
            raise FactoryError(f"cannot train {factory} on {size} vectors: {error}") from None
    add_vectors(index, vectors, ids, on_progress=on_progress, checked=True)
    return index


def add_vectors(
    index: faiss.Index,
    vectors: np.ndarray,
    ids: np.ndarray,
    *,
    on_progress: Callable[[int], None] | None = None,
    checked: bool = False,
    chunk: int = 65_536,
) -> None:
    """Add ``vectors`` with ``ids`` to a trained ``index``, in chunks (for progress bars).

    Ids must be new to the index: FAISS does not check, and a duplicate id is returned twice.
    """
    if not checked:
        vectors = _check_vectors(vectors, "vectors", index.d)
        ids = _check_ids(ids, len(vectors))
    if vectors.shape[1] != index.d:
        raise ValueError(f"vectors have dim {vectors.shape[1]}, the index has dim {index.d}")
    if index in _READ_ONLY:
        raise ValueError("this index was loaded memory-mapped and is read-only")
    for start in range(0, len(vectors), chunk):
        index.add_with_ids(vectors[start : start + chunk], ids[start : start + chunk])
        if on_progress is not None:
            on_progress(min(chunk, len(vectors) - start))


def supports_remove(index: faiss.Index) -> bool:
    """Whether ``remove_ids`` works: IVF (own ids) and flat codes under an id map can; HNSW,
    GPU and memory-mapped indexes cannot."""
    if index in _READ_ONLY or _is_gpu(index):
        return False
    if _native_ivf(index) is not None:
        return True
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        # IDMap renumbers its id list assuming the inner index compacts, which flat codes do.
        return isinstance(faiss.downcast_index(index.index), faiss.IndexFlatCodes)
    return False


def remove_ids(index: faiss.Index, ids: np.ndarray) -> int:
    """Remove ``ids`` from ``index``; returns how many were there. Unknown ids are ignored."""
    if not supports_remove(index):
        raise ValueError(
            f"{type(_unwrap(index)).__name__} cannot remove vectors "
            "(HNSW, GPU and memory-mapped indexes cannot): rebuild it without them"
        )
    ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
    if ids.size == 0:
        return 0
    return int(index.remove_ids(faiss.IDSelectorBatch(ids)))


# --------------------------------------------------------------------------------------------
# Searching


def exact_search(
    vectors: np.ndarray, queries: np.ndarray, k: int, *, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product: (scores [Q, k], rows of ``vectors`` or their ``ids``),
    padded with score -inf and id -1 when there are fewer than ``k`` vectors."""
    _check_k(k)
    vectors = _check_vectors(vectors, "vectors")
    queries = _check_vectors(queries, "queries", vectors.shape[1])
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
    An :class:`AllowedIds` brings its selector built (a cached filter's).
    """
    _check_k(k)
    queries = _check_vectors(queries, "queries", index.d)
    if allowed is None:
        scores, labels = index.search(queries, k)
        return _finish(scores, labels)
    if not isinstance(allowed, AllowedIds):
        allowed = AllowedIds(allowed)
    ids = allowed.ids
    if ids.size == 0 or len(queries) == 0:
        return _finish(*_empty(len(queries), k))
    if _is_gpu(index):
        scores, labels = _post_filtered(index, queries, k, ids)
    else:
        params = filter_params(index, allowed.selector())
        scores, labels = index.search(queries, k, params=params)
    short = np.count_nonzero(labels >= 0, axis=1) < min(k, ids.size)
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
    inner = _unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        return _make(
            "SearchParametersIVF",
            sel=selector,
            nprobe=int(inner.nprobe),
            max_codes=int(inner.max_codes),
        )
    if isinstance(inner, faiss.IndexHNSW):
        return _make(
            "SearchParametersHNSW",
            sel=selector,
            efSearch=int(inner.hnsw.efSearch),
            check_relative_distance=bool(getattr(inner.hnsw, "check_relative_distance", True)),
        )
    return _make("SearchParameters", sel=selector)


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
    if _is_gpu(index):
        # A GPU index has no selector support; its CPU copy has (costly, but only on short rows).
        return _exhaustive(to_cpu(index), queries, k, allowed, None)
    selector = faiss.IDSelectorBatch(allowed)
    ivf = _native_ivf(index)
    if ivf is not None:
        params = _make("SearchParametersIVF", sel=selector, nprobe=int(ivf.nlist), max_codes=0)
        return index.search(queries, k, params=params)
    outer = faiss.downcast_index(index)
    inner = _unwrap(index)
    if isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2) and isinstance(
        inner, faiss.IndexHNSW
    ):
        # Scan HNSW's flat storage with the selector translated to storage positions.
        storage = faiss.downcast_index(inner.storage)
        translated = _make("IDSelectorTranslated", outer.id_map, selector)
        scores, rows = storage.search(queries, k, params=_make("SearchParameters", sel=translated))
        id_map = faiss.rev_swig_ptr(outer.id_map.data(), outer.id_map.size())
        return scores, np.where(rows >= 0, id_map[np.maximum(rows, 0)], -1)
    if isinstance(outer, faiss.IndexIDMap | faiss.IndexIDMap2):
        # Flat codes: the filtered search already visited every allowed id.
        return index.search(queries, k, params=_make("SearchParameters", sel=selector))
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


# --------------------------------------------------------------------------------------------
# Files


def save_index(index: faiss.Index, path: Path) -> None:
    """Write ``index`` to ``path`` atomically: a temporary file beside it, fsynced, then
    ``os.replace``; a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    cpu = to_cpu(index)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        faiss.write_index(cpu, tmp_name)
        with open(tmp_name, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    with contextlib.suppress(OSError):  # directories cannot be fsynced on some filesystems
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_index(path: Path, *, mmap: bool = False) -> faiss.Index:
    """Read an index written by ``save_index``.

    ``mmap=True`` maps IVF lists and flat codes (also under IDMap2 and HNSW) from the file instead
    of copying them: replicas share the page cache and start at once. Such an index is read-only
    (``add_vectors`` and ``remove_ids`` refuse it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FAISS index not found: {path}")
    flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0  # maps IVF lists and flat codes alike
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise IndexFileError(f"{path} is not a readable FAISS index ({reason})") from None
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexFileError(f"{path} was built for metric {index.metric_type}, not inner product")
    if mmap:
        _READ_ONLY.add(index)
    return index


def index_bytes(index: faiss.Index) -> int:
    """Size of ``index`` serialised (what ``save_index`` writes)."""
    return int(faiss.serialize_index(to_cpu(index)).nbytes)
