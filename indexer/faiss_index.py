"""The FAISS layer of the indexer: build, edit, save and load indexes (``faiss_choice`` picks
the factory, ``faiss_search`` searches them, optionally filtered).

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
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import faiss
import numpy as np

from indexer.errors import FactoryError, IndexFileError
from indexer.faiss_choice import MIN_TRAIN_PER_LIST, default_nprobe

log = logging.getLogger(__name__)

HNSW_EF_CONSTRUCTION: Final = 40
HNSW_EF_SEARCH: Final = 64
NORM_TOLERANCE: Final = 1e-2
"""fp16 encoders give norms off by ~1e-3; anything further is not a normalised embedding."""

# Indexes loaded memory-mapped: their codes live in a read-only mapping, and FAISS would write
# into it on add/remove (a segfault, not an error). FAISS objects refuse new attributes, hence a
# set of them; weak, so it never keeps one alive.
_READ_ONLY: Final[weakref.WeakSet[faiss.Index]] = weakref.WeakSet()


def make(name: str, *args: Any, **fields: Any) -> Any:
    """``faiss.<name>(*args, **fields)``: the stubs bundled with faiss lack the keyword
    arguments of the SearchParameters classes and some constructors' overloads."""
    return getattr(faiss, name)(*args, **fields)


# --------------------------------------------------------------------------------------------
# Validation


def check_vectors(x: Any, name: str, dim: int | None = None) -> np.ndarray:
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
    return check_vectors(queries, "queries", dim)


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


def check_k(k: int) -> None:
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, not {k!r}")


# --------------------------------------------------------------------------------------------
# Index structure


def unwrap(index: faiss.Index) -> faiss.Index:
    """The index under any IndexIDMap/IndexIDMap2 wrappers, downcast to its real class."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap | faiss.IndexIDMap2):
        index = faiss.downcast_index(index.index)
    return index


def native_ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    """``index`` itself as an IndexIVF when it is one (ids in its lists), else None."""
    index = faiss.downcast_index(index)
    return index if isinstance(index, faiss.IndexIVF) else None


def is_gpu_index(index: faiss.Index) -> bool:
    """Whether ``index`` (or what it wraps) lives on a GPU, where FAISS takes no ID selectors;
    always False with faiss-cpu."""
    gpu_base = getattr(faiss, "GpuIndex", None)
    while True:
        index = faiss.downcast_index(index)
        if gpu_base is not None and isinstance(index, gpu_base):
            return True
        if isinstance(index, faiss.IndexReplicas | faiss.IndexShards):
            shards: Any = index  # ThreadedIndex's count/at are missing from the stubs
            return bool(shards.count() > 0 and is_gpu_index(shards.at(0)))
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
    options.useFloat16 = isinstance(unwrap(index), faiss.IndexIVFPQ)
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError as error:
        log.info("%s stays on the CPU: %s", type(unwrap(index)).__name__, error)
        return index


def to_serving_device(index: faiss.Index, use_gpu: bool | None = None) -> faiss.Index:
    """``index`` on the GPUs when ``use_gpu`` (None: when FAISS sees one), else itself."""
    return _to_gpu(index) if _want_gpu(use_gpu) else index


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (for saving, removing); a CPU index is returned as it is."""
    return faiss.index_gpu_to_cpu(index) if is_gpu_index(index) else index


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
    inner = unwrap(index)
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
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        return {"nlist": int(inner.nlist), "nprobe": int(inner.nprobe)}
    if isinstance(inner, faiss.IndexHNSW):
        return {"efSearch": int(inner.hnsw.efSearch)}
    gpu_ivf: Any = inner  # a GpuIndexIVF, which the stubs do not describe
    if is_gpu_index(index) and hasattr(gpu_ivf, "nprobe"):
        return {"nlist": int(gpu_ivf.nlist), "nprobe": int(gpu_ivf.nprobe)}
    return {}


def set_search_params(
    index: faiss.Index, *, nprobe: int | None = None, ef_search: int | None = None
) -> None:
    """Set IVF ``nprobe`` (clipped to nlist) and/or HNSW ``ef_search`` on ``index``."""
    inner = unwrap(index)
    if nprobe is not None:
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, not {nprobe}")
        if is_gpu_index(index):
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
    inner = unwrap(index)
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
    vectors = check_vectors(vectors, "vectors")
    ids = _check_ids(ids, len(vectors))
    dim = vectors.shape[1]
    index = new_index(factory, dim)
    _set_default_search_params(index)
    defaults = get_search_params(index)
    nlist = defaults.get("nlist", 0)
    if _want_gpu(use_gpu):
        index = _to_gpu(index)
        if is_gpu_index(index) and "nprobe" in defaults:  # GPU IVF copies start at nprobe 1
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
        vectors = check_vectors(vectors, "vectors", index.d)
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
    if index in _READ_ONLY or is_gpu_index(index):
        return False
    if native_ivf(index) is not None:
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
            f"{type(unwrap(index)).__name__} cannot remove vectors "
            "(HNSW, GPU and memory-mapped indexes cannot): rebuild it without them"
        )
    ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
    if ids.size == 0:
        return 0
    return int(index.remove_ids(faiss.IDSelectorBatch(ids)))


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

    ``mmap=True`` maps the bulk of the index from the file instead of copying it: IVF lists
    (``ArrayInvertedLists``), flat codes (``Flat``, ``SQ``, ``PQ`` under IDMap2) and HNSW's
    storage and links, with FAISS >= 1.11's ``IO_FLAG_MMAP_IFC``; replicas share the page cache
    and start at once. Such an index is read-only (``add_vectors`` and ``remove_ids`` refuse
    it). A type or FAISS version that cannot map is read into RAM instead, with a log line;
    the id maps (IDMap2's id list and hash) are always read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FAISS index not found: {path}")
    index = _read(path, faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexFileError(f"{path} was built for metric {index.metric_type}, not inner product")
    if mmap and is_mapped(index):
        _READ_ONLY.add(index)
    elif mmap:
        log.info(
            "%s: FAISS %s cannot map %s; read into RAM instead",
            path, faiss.__version__, type(unwrap(index)).__name__,
        )  # fmt: skip
    return index


def _read(path: Path, flags: int) -> faiss.Index:
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as error:
        if flags:  # a reader that cannot map this type: the plain one says whether it is valid
            log.info("%s cannot be read memory-mapped (%s); reading it into RAM", path, error)
            return _read(path, 0)
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise IndexFileError(f"{path} is not a readable FAISS index ({reason})") from None


def is_mapped(index: faiss.Index) -> bool:
    """Whether the bulk of ``index`` (its codes, where they live) is a view of a mapped file
    rather than memory FAISS owns: ``load_index(mmap=True)`` on a type FAISS can map."""
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexIVF):
        held: Any = inner.invlists  # (the stubs lack ArrayInvertedLists.codes)
        if not isinstance(faiss.downcast_InvertedLists(held), faiss.ArrayInvertedLists):
            return False
        array: Any = faiss.downcast_InvertedLists(held)
        filled = next((i for i in range(array.nlist) if array.list_size(i)), None)
        return filled is not None and _borrowed(array.codes.at(filled))
    if isinstance(inner, faiss.IndexHNSW):
        inner = faiss.downcast_index(inner.storage)
    if isinstance(inner, faiss.IndexFlatCodes):
        return _borrowed(inner.codes)
    return False


def _borrowed(vector: Any) -> bool:
    """Whether a FAISS ``MaybeOwnedVector`` points into memory it does not own (a mapping);
    older FAISS, whose vectors always own their data, has no such flag."""
    return getattr(vector, "is_owned", True) is False


def index_bytes(index: faiss.Index) -> int:
    """Size of ``index`` serialised (what ``save_index`` writes)."""
    return int(faiss.serialize_index(to_cpu(index)).nbytes)
