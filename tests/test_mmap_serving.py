"""Served collections are memory-mapped: the same answers as a copy read into RAM, read-only.

Each collection is written through the real writers (``write_version``, ``add_encoded``) and
opened twice, mapped and not; the mapped one must answer every query exactly as the other does,
refuse every change to its indexes, and hold its ids and vectors as ``np.memmap``. The service's
registry opens mapped unless told otherwise.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from indexer.assemble import write_version
from indexer.collection import Collection
from indexer.faiss_index import (
    add_vectors,
    get_search_params,
    is_mapped,
    remove_ids,
    set_search_params,
    supports_remove,
)
from indexer.index_bundle import IndexInfo
from indexer.metadata import Item
from indexer.update import add_encoded, remove_from_collection
from indexer.versions import publish, staging
from service.metrics import Metrics
from service.registry import CollectionRegistry
from service.settings import Settings

DIM = 16
NAME = "c"
BUNDLE = "b" * 64


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items_for(ids: np.ndarray) -> list[Item]:
    return [
        Item(id=int(i), kind="image", uri=f"u/{i}", group_id=f"g{i}", metadata={"odd": int(i) % 2})
        for i in ids
    ]


def grown(root: Path, factory: str, rng: np.random.Generator) -> None:
    """A collection built as ``factory`` (600 items), then two small adds (``Flat``
    segments) and a removal, as it would be served after a while."""
    ids = np.arange(600, dtype=np.int64)
    info = IndexInfo(
        collection=NAME, kind="image", modality="image", count=0, live=0, dim=DIM,
        factory=factory, model_bundle_id=BUNDLE, recall_at_10=0.0, build={},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    with staging(root, NAME) as staged:
        write_version(staged, ids, unit(rng, 600), items_for(ids), factory, info)
        publish(root, NAME, staged, keep=3)
    for first, n in ((600, 40), (640, 25)):
        added = np.arange(first, first + n, dtype=np.int64)
        add_encoded(root, NAME, added, unit(rng, n), items_for(added), keep_versions=3)
    remove_from_collection(root, NAME, ids=[3, 5, 601, 650], keep_versions=3)


def assert_same_answers(mapped: Collection, copied: Collection, queries: np.ndarray) -> None:
    for filters in (None, {"odd": 1}):
        for k in (1, 10):
            scores, ids = mapped.nearest(queries, k, filters=filters)
            want_scores, want_ids = copied.nearest(queries, k, filters=filters)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_array_equal(scores, want_scores)
            assert (ids[:, 0] >= 0).all()


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,Flat", "IVF4,PQ4", "IVF4,SQ8"])
def test_a_mapped_collection_answers_as_one_read_into_ram_and_refuses_changes(
    tmp_path: Path, factory: str
) -> None:
    rng = np.random.default_rng(0)
    grown(tmp_path, factory, rng)
    queries = unit(rng, 20)
    with (
        Collection.open(tmp_path, NAME, mmap=True) as mapped,
        Collection.open(tmp_path, NAME) as copied,
    ):
        assert len(mapped.segments.segments) == 3
        for segment in mapped.segments.segments:
            index = segment.index
            assert index is not None
            assert is_mapped(index)
            assert isinstance(segment.ids, np.memmap)
            assert isinstance(segment.vectors(), np.memmap)
            assert not supports_remove(index)
            with pytest.raises(ValueError, match="cannot remove"):
                remove_ids(index, segment.ids[:1])
            with pytest.raises(ValueError, match="memory-mapped and is read-only"):
                add_vectors(index, unit(rng, 1), np.array([10**6]))
        for segment in copied.segments.segments:
            assert segment.index is not None
            assert not is_mapped(segment.index)
            assert not isinstance(segment.ids, np.memmap)
        assert_same_answers(mapped, copied, queries)
        # The search knobs are fields of the index, not of the mapped file: they still move.
        base = mapped.segments.segments[0].index
        assert base is not None
        knobs = get_search_params(base)
        if "nprobe" in knobs:
            set_search_params(base, nprobe=knobs["nlist"])
            other = copied.segments.segments[0].index
            assert other is not None
            set_search_params(other, nprobe=knobs["nlist"])
            assert_same_answers(mapped, copied, queries)


def test_the_tail_runs_on_a_mapped_ivf_base_and_a_swap_keeps_the_mapped_segments(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    grown(tmp_path, "IVF4,PQ4", rng)
    mapped = Collection.open(tmp_path, NAME, mmap=True, rescore=3)
    copied = Collection.open(tmp_path, NAME, rescore=3)
    assert mapped.segments._tail is not None
    assert mapped.segments._tail.count == 40 + 25 - 2
    queries = unit(rng, 30)
    assert_same_answers(mapped, copied, queries)
    # A new version over the same segments plus one: the served ones are shared, still mapped.
    added = np.arange(700, 710, dtype=np.int64)
    add_encoded(tmp_path, NAME, added, unit(rng, 10), items_for(added), keep_versions=3)
    swapped = Collection.open(tmp_path, NAME, mmap=True, rescore=3, previous=mapped)
    assert len(swapped.loaded) == 1
    held = {s.id: s for s in mapped.segments.segments}
    for segment in swapped.segments.segments:
        assert segment.index is not None
        assert is_mapped(segment.index)
        assert segment.id in swapped.loaded or segment is held[segment.id]
    with Collection.open(tmp_path, NAME, rescore=3) as again:
        assert_same_answers(swapped, again, queries)
    for opened in (swapped, mapped, copied):
        opened.close()


def test_the_registry_serves_mapped_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COTS_MMAP", raising=False)
    monkeypatch.delenv("COTS_RESCORE", raising=False)
    assert Settings().mmap is True
    assert Settings().rescore is None
    grown(tmp_path, "IVF4,Flat", np.random.default_rng(2))
    registry = CollectionRegistry(tmp_path, BUNDLE, Metrics(), names=[NAME], use_gpu=False)
    monkeypatch.setenv("COTS_MMAP", "false")
    monkeypatch.setenv("COTS_RESCORE", "2")
    settings = Settings()
    told = CollectionRegistry(
        tmp_path, BUNDLE, Metrics(), names=[NAME], use_gpu=False,
        mmap=settings.mmap, rescore=settings.rescore,
    )  # fmt: skip
    try:
        assert registry.refresh() == [NAME]
        assert told.refresh() == [NAME]
        served, unmapped = registry.get(NAME), told.get(NAME)
        assert served is not None
        assert unmapped is not None
        for segment in served.segments.segments:
            assert segment.index is not None
            assert is_mapped(segment.index)
            assert isinstance(segment.ids, np.memmap)
        for segment in unmapped.segments.segments:
            assert segment.index is not None
            assert not is_mapped(segment.index)
        assert unmapped.segments.rescore == 2
    finally:
        registry.close()
        told.close()
