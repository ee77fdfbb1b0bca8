"""Segments written from chunks (indexer.large_segment) against write_segment's in memory."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.collection import Collection
from indexer.faiss_search import exact_search, recall_of
from indexer.large_segment import (
    Chunk,
    TopK,
    build_large_collection,
    train_index,
    training_rows,
    write_segment_streaming,
)
from indexer.metadata import Item, MetadataStore
from indexer.segments import Segment, write_segment
from indexer.synthetic_vectors import Mixture

DIM = 32


def _items(ids: np.ndarray) -> list[Item]:
    return [
        Item(id=int(i), kind="image", uri=f"mem://{i}", group_id=f"g{i}", metadata={"n": int(i)})
        for i in ids
    ]


def _source(vectors: np.ndarray, ids: np.ndarray, chunk: int) -> Iterator[Chunk]:
    for start in range(0, len(ids), chunk):
        stop = start + chunk
        yield ids[start:stop], vectors[start:stop], _items(ids[start:stop])


@pytest.mark.parametrize("factory", ["IVF16,Flat", "IVF16,PQ8"])
def test_streaming_segment_equals_the_one_written_in_memory(tmp_path: Path, factory: str) -> None:
    mixture = Mixture(DIM, clusters=32, latent=8, seed=3)
    vectors = mixture.sample(3000, seed=4)
    ids = np.arange(3000, dtype=np.int64) * 3 + 11
    items = _items(ids)
    memory = write_segment(tmp_path / "memory", ids, vectors, items, factory, ["n"])
    streamed = write_segment_streaming(
        tmp_path / "streamed",
        lambda: _source(vectors, ids, 700),
        count=len(ids),
        dim=DIM,
        factory=factory,
        index_fields=["n"],
    )
    assert sorted(p.name for p in (tmp_path / "memory").iterdir()) == sorted(
        p.name for p in (tmp_path / "streamed").iterdir()
    )
    assert (streamed.count, streamed.first_id, streamed.last_id, streamed.vectors_dtype) == (
        memory.count,
        memory.first_id,
        memory.last_id,
        memory.vectors_dtype,
    )
    assert streamed.files.keys() == memory.files.keys()
    for name in ("ids.npy", "vectors.npy"):  # byte for byte: same header, same rows
        assert (tmp_path / "streamed" / name).read_bytes() == (
            tmp_path / "memory" / name
        ).read_bytes()
    # The same training rows and k-means seed: the same index, so the same answers.
    a, b = Segment(tmp_path / "memory"), Segment(tmp_path / "streamed")
    queries = mixture.sample(50, seed=9)
    assert a.index is not None
    assert b.index is not None
    assert np.array_equal(a.index.search(queries, 10)[1], b.index.search(queries, 10)[1])
    assert abs(streamed.recall_at_10 - memory.recall_at_10) <= 0.02
    assert a.store.get(ids[[0, 1500, 2999]]) == b.store.get(ids[[0, 1500, 2999]])
    assert b.store.ids_matching({"n": int(ids[5])}).tolist() == [int(ids[5])]  # indexed field
    a.close()
    b.close()


def test_a_given_trained_index_is_used_and_left_empty(tmp_path: Path) -> None:
    mixture = Mixture(DIM, clusters=32, latent=8, seed=3)
    vectors = mixture.sample(2000, seed=5)
    ids = np.arange(2000, dtype=np.int64)
    rows = training_rows(2000, "IVF8,PQ4", DIM, 1000, 0)
    trained = train_index(vectors[rows], "IVF8,PQ4", DIM)
    info = write_segment_streaming(
        tmp_path / "s",
        lambda: _source(vectors, ids, 512),
        count=2000,
        dim=DIM,
        factory="IVF8,PQ4",
        trained=trained,
    )
    assert trained.ntotal == 0
    assert info.count == 2000
    written = Segment(tmp_path / "s").index
    assert written is not None

    def centroids(index: faiss.Index) -> np.ndarray:
        return faiss.downcast_index(faiss.extract_index_ivf(index).quantizer).reconstruct_n(0, 8)

    assert np.array_equal(centroids(written), centroids(trained))


def test_bad_chunks_are_refused(tmp_path: Path) -> None:
    vectors = Mixture(DIM, seed=1).sample(100, seed=2)
    ids = np.arange(100, dtype=np.int64)

    def shuffled() -> Iterator[Chunk]:
        yield ids[50:], vectors[50:], _items(ids[50:])
        yield ids[:50], vectors[:50], _items(ids[:50])

    with pytest.raises(ValueError, match="ascending"):
        write_segment_streaming(tmp_path / "a", shuffled, count=100, dim=DIM, factory="Flat")
    with pytest.raises(ValueError, match="not count=120"):
        write_segment_streaming(
            tmp_path / "b", lambda: _source(vectors, ids, 30), count=120, dim=DIM, factory="Flat"
        )


def test_top_k_over_blocks_is_exact_search() -> None:
    mixture = Mixture(DIM, seed=2)
    vectors, queries = mixture.sample(5000, seed=1), mixture.sample(40, seed=2)
    ids = np.arange(5000, dtype=np.int64) * 2
    merged = TopK(queries, 10)
    for start in range(0, 5000, 777):
        merged.add(ids[start : start + 777], vectors[start : start + 777])
    _, expected = exact_search(vectors, queries, 10, ids=ids)
    assert recall_of(merged.ids, expected) == 1.0


@pytest.mark.slow  # 200k vectors generated twice and indexed: 30-80 s on 2 busy cores
def test_a_large_build_holds_one_chunk_and_serves_memory_mapped(tmp_path: Path) -> None:
    """200k x 256 float32 is 205 MB; the build's Python heap (numpy's arrays included) stays
    a fraction of it: a chunk, the training rows, a block read back for recall. The index's
    codes live in FAISS's C++ heap: 200k x (16 + 8) B = 5 MB."""
    dim, count, chunk = 256, 200_000, 5000
    mixture = Mixture(dim, seed=7)

    def source() -> Iterator[Chunk]:
        for n, start in enumerate(range(0, count, chunk)):
            ids = np.arange(start, start + chunk, dtype=np.int64)
            rows = [
                Item.model_construct(
                    id=int(i),
                    kind="image",
                    uri=f"s://{i}",
                    group_id="g",
                    caption=None,
                    metadata={},
                    start_s=None,
                    end_s=None,
                )
                for i in ids
            ]
            yield ids, mixture.sample(chunk, seed=100 + n), rows

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # two OpenMP threads on a busy 2-core machine are far slower
    tracemalloc.start()
    try:
        version, info = build_large_collection(
            tmp_path / "root",
            "big",
            source,
            count=count,
            dim=dim,
            factory="IVF64,PQ16",
            model_bundle_id="0" * 64,
            train_sample=5000,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        faiss.omp_set_num_threads(threads)
    assert peak < 50 * 2**20, f"peak Python heap {peak / 2**20:.0f} MiB"
    assert version == 1
    assert info.count == count
    assert info.recall_at_10 > 0.3
    saved = json.loads((tmp_path / "root" / "big" / "current" / "index.json").read_text())
    assert saved["segments"] == info.segments
    assert saved["files"]
    queries = mixture.sample(chunk, seed=100)[:20]  # rows 0..19: the first chunk's first
    with Collection.open(tmp_path / "root", "big", mmap=True) as collection:
        _, found = collection.nearest(queries, 10)
        hits = collection.search(queries[:1], 3)
    assert (found == np.arange(20)[:, None]).any(axis=1).mean() >= 0.9  # each finds itself
    assert hits[0][0].item.uri == "s://0"
    with MetadataStore.open(
        tmp_path / "root" / "big" / "segments" / info.segments[0] / "metadata.sqlite"
    ) as store:
        assert store.count() == count
