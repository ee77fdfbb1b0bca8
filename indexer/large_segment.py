"""Segments larger than RAM: train on a sample, add in chunks, write files as chunks arrive.

``write_segment`` (``indexer.segments``) holds every float32 vector of a segment at once; at
10M x 256 that is 10 GB. :func:`write_segment_streaming` writes the same files from a
re-callable source of chunks and holds one chunk of vectors at a time, plus the index's codes:

``chunks() pass 1 -> the seeded training rows -> train_index (coarse quantizer, PQ)``
``chunks() pass 2 -> per chunk: check -> add to the index -> append ids.npy, vectors.npy
(its dtype) -> metadata rows``
``vectors.npy read back in blocks -> exact top 10 of 200 stored vectors -> recall_at_10``
``-> index.faiss, digests, segment.json``

The training rows are the ones ``build_index`` would pick (same seed, same sample size), so a
segment written here from the same data is the one ``write_segment`` writes. The ``.npy``
files are written through a file handle, not a memory map: mapped pages count in the writer's
resident set and stay there while memory is free, which would make a build look as large as
its vectors. The index's codes stay in RAM while it is built (IVF-PQ32: 40 B a vector with its
id, 400 MB at 10M): FAISS ``OnDiskInvertedLists`` would only be needed past that, and the
server maps a normally written IVF file's lists anyway (``load_index(mmap=True)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import faiss
import numpy as np

from indexer.assemble import seal
from indexer.build_spec import CorpusKind
from indexer.digests import file_digest
from indexer.errors import FactoryError
from indexer.faiss_choice import MIN_TRAIN_PER_LIST, default_nprobe
from indexer.faiss_index import (
    HNSW_EF_SEARCH,
    add_vectors,
    check_vectors,
    get_search_params,
    new_index,
    save_index,
    set_search_params,
    unwrap,
)
from indexer.faiss_search import recall_of, search
from indexer.index_bundle import DELETED, SEGMENTS, IndexInfo
from indexer.metadata import Item, MetadataStore
from indexer.segments import (
    RECALL_QUERIES,
    SEGMENT_IDS,
    SEGMENT_INDEX,
    SEGMENT_JSON,
    SEGMENT_METADATA,
    SEGMENT_VECTORS,
    SegmentInfo,
    keeps_exact_floats,
    new_segment_id,
)
from indexer.versions import publish, staging
from runtime.bundle import Modality

Chunk = tuple[np.ndarray, np.ndarray, Sequence[Item]]
"""(ids ascending int64 [n], float32 unit vectors [n, d], the ids' metadata rows)."""
Chunks = Callable[[], Iterable[Chunk]]
"""A source that can be read again from the start: one pass samples, the next adds."""

FAISS_KMEANS_SEED: Final = 1234  # FAISS's own default: seed 0 trains as build_index does
READ_BYTES: Final = 8 * 2**20  # float32 vectors read back from vectors.npy at once


def train_index(sample: np.ndarray, factory: str, dim: int, *, seed: int = 0) -> faiss.Index:
    """An empty ``factory`` index trained on ``sample`` [n, dim] float32 (coarse quantizer and
    PQ/SQ codebooks), search defaults set (nprobe = nlist/8 in [1, 64]). ``seed`` offsets
    FAISS's k-means seed; 0 trains exactly as ``build_index`` does on the same rows."""
    sample = check_vectors(sample, "training vectors", dim)
    index = new_index(factory, dim)
    inner = unwrap(index)
    if isinstance(inner, faiss.IndexHNSW):
        set_search_params(index, ef_search=HNSW_EF_SEARCH)
    if isinstance(inner, faiss.IndexIVF):
        set_search_params(index, nprobe=default_nprobe(int(inner.nlist)))
        inner.cp.seed = FAISS_KMEANS_SEED + seed
        if isinstance(inner, faiss.IndexIVFPQ):
            inner.pq.cp.seed = FAISS_KMEANS_SEED + seed
    if not index.is_trained:
        nlist = get_search_params(index).get("nlist", 0)
        if len(sample) < max(nlist, 1):
            raise FactoryError(
                f"{factory} needs at least {nlist} vectors to train, got {len(sample)}"
            )
        try:
            index.train(sample)
        except RuntimeError as error:
            raise FactoryError(
                f"cannot train {factory} on {len(sample)} vectors: {error}"
            ) from None
    return index


def training_rows(count: int, factory: str, dim: int, train_sample: int, seed: int) -> np.ndarray:
    """The rows (ascending) ``build_index`` trains ``factory`` on for ``count`` vectors: a
    seeded sample of ``train_sample``, raised to 39 a list for IVF."""
    nlist = get_search_params(new_index(factory, dim)).get("nlist", 0)
    size = min(count, max(train_sample, MIN_TRAIN_PER_LIST * nlist))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=size, replace=False))


def gather_rows(chunks: Chunks, rows: np.ndarray, dim: int) -> np.ndarray:
    """The vectors at positions ``rows`` (ascending) of one pass over ``chunks``."""
    out = np.empty((len(rows), dim), dtype=np.float32)
    offset = taken = 0
    for _, vectors, _ in chunks():
        n = len(vectors)
        stop = int(np.searchsorted(rows, offset + n))
        if stop > taken:
            out[taken:stop] = np.asarray(vectors, dtype=np.float32)[rows[taken:stop] - offset]
            taken = stop
        offset += n
        if taken == len(rows):
            break
    if taken != len(rows):
        raise ValueError(f"the chunks hold {offset} vectors, fewer than the rows asked for")
    return out


class TopK:
    """Exact top ``k`` by inner product of fixed queries, merged over blocks of vectors that
    arrive one at a time (never all in memory)."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = np.ascontiguousarray(queries, dtype=np.float32)
        self.k = k
        self.scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        self.ids = np.full((len(queries), k), -1, dtype=np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids) or not len(self.queries):
            return
        block = np.ascontiguousarray(vectors, dtype=np.float32)
        found = min(self.k, len(block))
        scores, rows = faiss.knn(self.queries, block, found, metric=faiss.METRIC_INNER_PRODUCT)
        merged_scores = np.concatenate([self.scores, scores], axis=1)
        merged_ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)[rows]], axis=1)
        best = np.argsort(-merged_scores, axis=1, kind="stable")[:, : self.k]
        self.scores = np.take_along_axis(merged_scores, best, axis=1)
        self.ids = np.take_along_axis(merged_ids, best, axis=1)


class _NpyAppender:
    """An ``.npy`` file of known shape written front to back through a file handle."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: str) -> None:
        header = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        self.offset = int(header.offset)
        del header  # only the header and the file's size were wanted
        self.handle = path.open("r+b")
        self.handle.seek(self.offset)
        self.dtype = np.dtype(dtype)

    def append(self, rows: np.ndarray) -> None:
        self.handle.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())

    def close(self) -> None:
        self.handle.close()


@contextmanager
def _timed(timings: dict[str, float] | None, step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[step] = timings.get(step, 0.0) + time.perf_counter() - start


def stored_blocks(folder: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, float32 vectors) of a written segment, 8 MiB of float32 vectors at a time, read
    through file handles: a memory map would leave every page read in the resident set."""
    ids_map = np.load(folder / SEGMENT_IDS, mmap_mode="r")
    vectors_map = np.load(folder / SEGMENT_VECTORS, mmap_mode="r")
    count, dim = vectors_map.shape
    dtype, ids_at, vectors_at = vectors_map.dtype, int(ids_map.offset), int(vectors_map.offset)
    del ids_map, vectors_map
    block = max(1, READ_BYTES // (4 * max(dim, 1)))
    with (folder / SEGMENT_IDS).open("rb") as ids_file, (folder / SEGMENT_VECTORS).open("rb") as f:
        ids_file.seek(ids_at)
        f.seek(vectors_at)
        for start in range(0, count, block):
            n = min(block, count - start)
            ids = np.empty(n, dtype=np.int64)
            stored = np.empty((n, dim), dtype=dtype)
            read = ids_file.readinto(ids.data), f.readinto(stored.data)
            if read != (ids.nbytes, stored.nbytes):
                raise ValueError(f"{folder} ends before its {count} rows")
            yield ids, stored.astype(np.float32)


def write_segment_streaming(
    folder: Path,
    chunks: Chunks,
    *,
    count: int,
    dim: int,
    factory: str,
    index_fields: Sequence[str] = (),
    trained: faiss.Index | None = None,
    train_sample: int = 100_000,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
    timings: dict[str, float] | None = None,
    nprobe: int | None = None,
) -> SegmentInfo:
    """Write a complete segment into ``folder`` (new) from ``count`` vectors in ``chunks``.

    ``chunks()`` yields (ids, float32 unit vectors, items): ids ascending within and across
    chunks, items exactly the chunk's ids' rows. Without ``trained`` (an empty trained index,
    e.g. from :func:`train_index`, copied here, not changed), one pass gathers the rows
    ``build_index`` would train on and trains on them; then one pass adds. Writes the files
    ``write_segment`` writes; recall_at_10 is measured as it does, with the stored copies of
    200 seeded rows as queries. ``on_progress(n)`` after each chunk of n added;
    ``timings`` (when given) gets the seconds of each step (sample, train, add, files,
    metadata, recall, save, digests). ``nprobe`` (IVF) replaces the default nlist/8 in [1, 64]
    that the index file keeps for its searches."""
    if count < 0 or dim < 1:
        raise ValueError(f"count must be >= 0 and dim >= 1, not count={count}, dim={dim}")
    folder.mkdir(parents=True, exist_ok=False)
    index: faiss.Index | None = None
    if count:
        if trained is not None:
            if trained.d != dim or not trained.is_trained or trained.ntotal:
                raise ValueError(f"trained must be an empty trained index of dim {dim}")
            index = faiss.clone_index(trained)
        elif new_index(factory, dim).is_trained:  # Flat, HNSW: nothing to train
            index = train_index(np.zeros((0, dim), dtype=np.float32), factory, dim)
        else:
            with _timed(timings, "sample"):
                sample = gather_rows(
                    chunks, training_rows(count, factory, dim, train_sample, seed), dim
                )
            with _timed(timings, "train"):
                index = train_index(sample, factory, dim)
            del sample
    dtype: Literal["float32", "float16"] = "float32" if keeps_exact_floats(factory) else "float16"
    ids_file = _NpyAppender(folder / SEGMENT_IDS, (count,), "int64")
    vectors_file = _NpyAppender(folder / SEGMENT_VECTORS, (count, dim), dtype)
    store = MetadataStore.create(folder / SEGMENT_METADATA, index_fields)
    written, first_id, last_id = 0, -1, -1
    try:
        for ids, vectors, items in chunks():
            ids = np.asarray(ids)
            if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError("a chunk's ids must be a 1-D integer array")
            ids = ids.astype(np.int64, copy=False)
            if not len(ids):
                continue
            if written + len(ids) > count:
                raise ValueError(f"the chunks hold more than count={count} vectors")
            if int(ids[0]) <= last_id or (len(ids) > 1 and bool(np.any(np.diff(ids) <= 0))):
                raise ValueError("ids must be distinct and ascending within and across chunks")
            if int(ids[0]) < 0:
                raise ValueError("ids must be >= 0 (-1 marks a missing result)")
            vectors = check_vectors(vectors, "vectors", dim)
            if len(vectors) != len(ids):
                raise ValueError(f"a chunk has {len(ids)} ids and {len(vectors)} vectors")
            if [item.id for item in items] != ids.tolist():
                raise ValueError("a chunk's items must be exactly its ids' rows, in id order")
            assert index is not None  # count > 0
            with _timed(timings, "add"):
                add_vectors(index, vectors, ids, checked=True)
            with _timed(timings, "files"):
                ids_file.append(ids)
                vectors_file.append(vectors)
            with _timed(timings, "metadata"):
                store.add(list(items))
            first_id = int(ids[0]) if written == 0 else first_id
            last_id = int(ids[-1])
            written += len(ids)
            if on_progress is not None:
                on_progress(len(ids))
    finally:
        ids_file.close()
        vectors_file.close()
        store.close()
    if written != count:
        raise ValueError(f"the chunks held {written} vectors, not count={count}")
    recall = 1.0
    if index is not None:
        if nprobe is not None:
            set_search_params(index, nprobe=nprobe)
        with _timed(timings, "recall"):
            recall = _measure_recall(index, folder)
        with _timed(timings, "save"):
            save_index(index, folder / SEGMENT_INDEX)
    with _timed(timings, "digests"):
        files = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()}
    info = SegmentInfo(
        id=folder.name,
        count=count,
        first_id=first_id,
        last_id=last_id,
        dim=dim,
        factory=factory,
        vectors_dtype=dtype,
        recall_at_10=recall,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        files=files,
    )
    (folder / SEGMENT_JSON).write_text(info.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return info


def _measure_recall(index: faiss.Index, folder: Path) -> float:
    """``measure_recall``'s figure from the written files: the same 200 seeded rows as
    queries (their stored copies), exact top 10 over ``vectors.npy`` read back in blocks."""
    vectors = np.load(folder / SEGMENT_VECTORS, mmap_mode="r")
    rng = np.random.default_rng(0)
    rows = rng.choice(len(vectors), size=min(RECALL_QUERIES, len(vectors)), replace=False)
    queries = np.asarray(vectors[np.sort(rows)], dtype=np.float32)  # their order is moot
    exact = TopK(queries, 10)
    for ids, block in stored_blocks(folder):
        exact.add(ids, block)
    _, found = search(index, queries, 10)
    return recall_of(found, exact.ids)


def build_large_collection(
    root: Path,
    name: str,
    chunks: Chunks,
    *,
    count: int,
    dim: int,
    factory: str,
    model_bundle_id: str,
    kind: CorpusKind = "image",
    modality: Modality = "image",
    build: dict[str, Any] | None = None,
    keep_versions: int = 1,
    train_sample: int = 100_000,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
    timings: dict[str, float] | None = None,
    nprobe: int | None = None,
) -> tuple[int, IndexInfo]:
    """Publish a new version of collection ``name`` under ``root`` made of one segment
    written by :func:`write_segment_streaming` (as ``indexer.assemble.write_version`` does for
    one written in memory). ``build`` is recorded as index.json's ``build`` (its
    ``index_fields`` are the metadata keys indexed). Returns (version, its index.json)."""
    build = dict(build or {})
    with staging(root, name) as staged:
        segment_id = new_segment_id()
        written = write_segment_streaming(
            staged / SEGMENTS / segment_id,
            chunks,
            count=count,
            dim=dim,
            factory=factory,
            index_fields=[str(key) for key in build.get("index_fields", [])],
            train_sample=train_sample,
            seed=seed,
            on_progress=on_progress,
            timings=timings,
            nprobe=nprobe,
        )
        info = IndexInfo(
            collection=name,
            kind=kind,
            modality=modality,
            count=written.count,
            live=written.count,
            dim=dim,
            factory=factory,
            model_bundle_id=model_bundle_id,
            recall_at_10=written.recall_at_10,
            build=build,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            segments=[segment_id],
            max_id=written.last_id,
        )
        np.save(staged / DELETED, np.zeros(0, dtype=np.int64))
        info = seal(info, staged)
        info.write(staged)
        version = publish(root, name, staged, keep_versions)
    return version, info
