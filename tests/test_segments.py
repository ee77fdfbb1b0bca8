"""Search across immutable segments with a delete set answers as one index over the live items.

The reference is exact search (inner product) over the live items' vectors, computed here in
numpy. Random sequences of add / remove / compact (a model of what versions will do) are
checked after every step, with and without a filter; every index type the factory offers is
checked with its search made exhaustive (nprobe = nlist, a wide efSearch), where its answer
must be exact, except PQ, whose codes are lossy: it must still never return a removed item,
always return min(k, live) results, best first.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import indexer.allowed as allowed_module
from indexer.allowed import AllowedIds
from indexer.faiss_index import get_search_params, set_search_params
from indexer.faiss_search import recall_of
from indexer.metadata import Item
from indexer.segments import (
    OVERFETCH_TOMBSTONES,
    SEGMENT_VECTORS,
    Segment,
    SegmentedIndex,
    keeps_exact_floats,
    new_segment_id,
    write_segment,
)
from indexer.tail import ivf_base

DIM = 16
TAGS = ("red", "green", "blue")


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items_for(ids: np.ndarray) -> list[Item]:
    return [
        Item(
            id=int(i), kind="image", uri=f"img/{i}.png", group_id=f"g{i}",
            metadata={"tag": TAGS[int(i) % 3]},
        )
        for i in ids
    ]  # fmt: skip


@dataclass
class Model:
    """What a collection's versions would hold: segments, the delete set, and the truth."""

    folder: Path
    factory: str = "Flat"
    segments: list[Segment] = field(default_factory=list)
    deleted: set[int] = field(default_factory=set)
    vectors: dict[int, np.ndarray] = field(default_factory=dict)
    next_id: int = 0

    def add(self, rng: np.random.Generator, n: int) -> None:
        ids = np.arange(self.next_id, self.next_id + n, dtype=np.int64)
        self.next_id += n
        vectors = unit(rng, n)
        folder = self.folder / new_segment_id()
        write_segment(folder, ids, vectors, items_for(ids), self.factory)
        self.segments.append(Segment(folder))
        self.vectors.update(zip(ids.tolist(), vectors, strict=True))

    def remove(self, rng: np.random.Generator, fraction: float) -> None:
        live = sorted(set(self.vectors) - self.deleted)
        if live:
            chosen = rng.choice(live, size=int(len(live) * fraction), replace=False)
            self.deleted.update(int(i) for i in chosen)

    def compact(self) -> None:
        """Merge every segment's live items into one (what compaction will do)."""
        index = self.index()
        ids = np.array(sorted(set(self.vectors) - self.deleted), dtype=np.int64)
        stored: dict[int, np.ndarray] = {}
        for segment in self.segments:
            keep = ~np.isin(segment.ids, list(self.deleted))
            kept = segment.ids[keep]
            stored.update(zip(kept.tolist(), segment.lookup(kept), strict=True))
        index.close()
        self.segments = []
        for i in set(self.vectors) - set(ids.tolist()):
            del self.vectors[i]
        self.deleted = set()
        if len(ids):
            folder = self.folder / new_segment_id()
            vectors = np.stack([stored[int(i)] for i in ids])
            write_segment(folder, ids, vectors, items_for(ids), self.factory)
            self.segments.append(Segment(folder))

    def index(self, rescore: int | None = None) -> SegmentedIndex:
        deleted = np.array(sorted(self.deleted), dtype=np.int64)
        return SegmentedIndex(self.segments, deleted, rescore=rescore)

    def exact(
        self, queries: np.ndarray, k: int, tag: str | None = None, *, decoded: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top k over the live items' vectors (``decoded``: over what each segment's
        index holds of them, its codes decoded: the exact answer for lossy codes)."""
        ids = np.array(
            [
                i for i in sorted(self.vectors)
                if i not in self.deleted and (tag is None or TAGS[i % 3] == tag)
            ],
            dtype=np.int64,
        )  # fmt: skip
        scores = np.full((len(queries), k), -np.inf, np.float32)
        found = np.full((len(queries), k), -1, np.int64)
        if len(ids):
            held = self.decoded() if decoded else self.vectors
            sims = queries @ np.stack([held[int(i)] for i in ids]).T
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            n = order.shape[1]
            scores[:, :n] = np.take_along_axis(sims, order, 1)
            found[:, :n] = ids[order]
        return scores, found

    def decoded(self) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        for segment in self.segments:
            assert segment.index is not None
            original = np.stack([self.vectors[int(i)] for i in segment.ids])
            if keeps_exact_floats(segment.info.factory):  # (an id-mapped Flat has no codec)
                out.update(zip(segment.ids.tolist(), original, strict=True))
                continue
            codes = segment.index.sa_decode(segment.index.sa_encode(original))
            out.update(zip(segment.ids.tolist(), codes, strict=True))
        return out


@pytest.fixture
def model(tmp_path: Path) -> Iterator[Model]:
    made = Model(tmp_path)
    yield made
    for segment in made.segments:
        segment.close()


def assert_answers_like_exact(
    index: SegmentedIndex,
    model: Model,
    queries: np.ndarray,
    k: int,
    tag: str | None = None,
    decoded: bool = False,
) -> None:
    filters = {"tag": tag} if tag else None
    scores, ids = index.nearest(queries, k, filters=filters)
    want_scores, want_ids = model.exact(queries, k, tag, decoded=decoded)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 40)),
        st.tuples(st.just("remove"), st.sampled_from([0.05, 0.3, 0.9])),
        st.tuples(st.just("compact"), st.just(0)),
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, seed=st.integers(0, 2**16), k=st.sampled_from([1, 5, 12]))
def test_random_adds_removes_and_compactions_answer_like_exact_search(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, float]], seed: int, k: int
) -> None:
    rng = np.random.default_rng(seed)
    model = Model(tmp_path_factory.mktemp("segments"))
    model.add(rng, 30)
    queries = unit(rng, 6)
    try:
        for op, amount in ops:
            if op == "add":
                model.add(rng, int(amount))
            elif op == "remove":
                model.remove(rng, float(amount))
            else:
                model.compact()
            index = model.index()
            assert index.live == len(set(model.vectors) - model.deleted)
            assert_answers_like_exact(index, model, queries, k)
            assert_answers_like_exact(index, model, queries, k, tag="green")
            # Hydration finds exactly the live hits, in order, with their items.
            scores, ids = index.nearest(queries, k)
            for row, hits in zip(ids, index.hydrate(scores, ids, k), strict=True):
                assert [hit.id for hit in hits] == [int(i) for i in row if i >= 0]
                assert all(hit.item.uri == f"img/{hit.id}.png" for hit in hits)
    finally:
        for segment in model.segments:
            segment.close()


def exhaustive(index: SegmentedIndex) -> None:
    for segment in index.segments:
        assert segment.index is not None
        params = get_search_params(segment.index)
        if "nlist" in params:
            set_search_params(segment.index, nprobe=params["nlist"])
        elif "efSearch" in params:
            set_search_params(segment.index, ef_search=1024)


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF4,Flat", "IVF4,SQfp16", "IVF4,PQ4"])
def test_every_index_type_answers_like_exact_search_over_what_it_holds(
    model: Model, factory: str
) -> None:
    rng = np.random.default_rng(7)
    model.factory = factory
    model.add(rng, 600)  # one large segment: many tombstones, the selector path
    model.add(rng, 300)  # (PQ's codebooks need 256 vectors a segment)
    model.add(rng, 260)
    first = model.segments[0].ids
    model.deleted.update(int(i) for i in first[: OVERFETCH_TOMBSTONES + 50])
    model.deleted.update(int(i) for i in model.segments[1].ids[:5])  # the over-fetch path
    index = model.index(rescore=1)  # lossy codes' own scores (tests/test_rescoring.py: r > 1)
    exhaustive(index)
    queries = unit(rng, 20)
    lossy = not keeps_exact_floats(factory)  # exact over the decoded codes
    for k in (1, 10, 50):
        assert_answers_like_exact(index, model, queries, k, decoded=lossy)
        assert_answers_like_exact(index, model, queries, k, tag="blue", decoded=lossy)


def test_pq_segments_never_return_removed_items_and_fill_k(model: Model) -> None:
    rng = np.random.default_rng(3)
    model.factory = "IVF4,PQ4"
    model.add(rng, 600)
    model.add(rng, 400)
    model.remove(rng, 0.5)
    index = model.index()
    exhaustive(index)
    queries = unit(rng, 20)
    scores, ids = index.nearest(queries, 10)
    assert not np.isin(ids, list(model.deleted)).any()
    assert (ids >= 0).all()
    assert (np.diff(scores, axis=1) <= 0).all()
    assert recall_of(ids, model.exact(queries, 10)[1]) > 0.5


def test_filtered_search_returns_k_whenever_k_items_match(model: Model) -> None:
    rng = np.random.default_rng(5)
    model.add(rng, 9)  # ids 0..8: three of each tag
    model.add(rng, 9)
    model.deleted.update({1, 4})  # two of the green ones (i % 3 == 1)
    index = model.index()
    _, ids = index.nearest(unit(rng, 3), 4, filters={"tag": "green"})
    assert [sorted(row) for row in ids.tolist()] == [[7, 10, 13, 16]] * 3


def test_an_empty_version_answers_with_padding(model: Model) -> None:
    scores, ids = model.index().nearest(unit(np.random.default_rng(0), 2), 3)
    assert ids.tolist() == [[-1] * 3] * 2
    assert np.isneginf(scores).all()


def test_vectors_are_stored_as_float16_unless_the_index_keeps_exact_floats(
    tmp_path: Path,
) -> None:
    assert keeps_exact_floats("Flat")
    assert keeps_exact_floats("IVF8,Flat")
    assert keeps_exact_floats("HNSW32")
    assert not keeps_exact_floats("IVF8,SQfp16")
    assert not keeps_exact_floats("IVF8,PQ4")
    rng = np.random.default_rng(0)
    ids = np.arange(300, dtype=np.int64)
    vectors = unit(rng, 300)
    info = write_segment(tmp_path / "s", ids, vectors, items_for(ids), "IVF4,SQfp16")
    assert info.vectors_dtype == "float16"
    stored = np.load(tmp_path / "s" / SEGMENT_VECTORS)
    assert stored.dtype == np.float16
    assert stored.nbytes == vectors.nbytes // 2
    segment = Segment(tmp_path / "s")
    np.testing.assert_allclose(segment.lookup(ids[[5, 17]]), vectors[[5, 17]], atol=1e-3)
    segment.close()


def test_a_segment_refuses_items_that_are_not_its_ids(tmp_path: Path) -> None:
    ids = np.arange(4, dtype=np.int64)
    vectors = unit(np.random.default_rng(0), 4)
    with pytest.raises(ValueError, match="items must be exactly"):
        write_segment(tmp_path / "s", ids, vectors, items_for(ids[:3]), "Flat")
    with pytest.raises(ValueError, match="distinct"):
        write_segment(tmp_path / "t", np.array([1, 1, 2, 3]), vectors, items_for(ids), "Flat")


def grow_on_ivf_base(
    model: Model, rng: np.random.Generator, base_factory: str, base_removed: int = 7
) -> None:
    """A collection as it grows: one IVF segment built, then small exact segments added;
    ``base_removed`` tombstones on the base (above OVERFETCH_TOMBSTONES: skipped by a
    selector on the shared assignment, else over-fetched)."""
    model.factory = base_factory
    model.add(rng, 600)
    model.factory = "Flat"
    for n in (40, 25, 60):
        model.add(rng, n)
    base, small = model.segments[0].ids, model.segments[2].ids
    model.deleted.update(int(i) for i in base[:base_removed])
    model.deleted.update(int(i) for i in small[:10])  # left out of the tail


@pytest.mark.parametrize("base_factory", ["IVF8,Flat", "IVF8,SQfp16", "IVF8,PQ4"])
def test_small_segments_on_an_ivf_base_answer_like_exact_search_when_every_list_is_probed(
    model: Model, base_factory: str
) -> None:
    rng = np.random.default_rng(11)
    grow_on_ivf_base(model, rng, base_factory)
    index = model.index(rescore=1)  # lossy codes' own scores (tests/test_rescoring.py: r > 1)
    assert index._tail is not None
    assert index._tail.count == 40 + 15 + 60
    exhaustive(index)  # nprobe = nlist on the base: the tail follows it
    queries = unit(rng, 25)
    lossy = not keeps_exact_floats(base_factory)
    for k in (1, 10, 50):
        assert_answers_like_exact(index, model, queries, k, decoded=lossy)
        assert_answers_like_exact(index, model, queries, k, tag="red", decoded=lossy)


@pytest.mark.parametrize("base_removed", [7, OVERFETCH_TOMBSTONES + 44])
def test_small_segments_on_an_ivf_base_answer_like_one_ivf_index_with_its_centroids(
    model: Model, base_removed: int
) -> None:
    """At the base's own nprobe the version answers exactly as one IVF-Flat index over all
    its live items with the base's centroids would: what compacting it (lists kept) gives."""
    rng = np.random.default_rng(12)
    grow_on_ivf_base(model, rng, "IVF8,Flat", base_removed)
    index = model.index()
    base = ivf_base(model.segments[0].index)
    assert base is not None
    assert index._tail is not None
    assert base.nprobe == 1  # default_nprobe(8): far from exhaustive
    one = faiss.IndexIVFFlat(base.quantizer, DIM, base.nlist, faiss.METRIC_INNER_PRODUCT)
    live = np.array(sorted(set(model.vectors) - model.deleted), dtype=np.int64)
    one.add_with_ids(np.stack([model.vectors[int(i)] for i in live]), live)
    one.nprobe = base.nprobe
    queries = unit(rng, 40)
    for k in (1, 10, 30):
        want_scores, want_ids = one.search(queries, k)
        scores, ids = index.nearest(queries, k)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores[ids >= 0], want_scores[want_ids >= 0], atol=1e-5)
    # The small segments' lists are computed once per base: a new version over the same
    # segments (a replica's swap) reuses them.
    held = [s._lists[model.segments[0].id] for s in model.segments[1:]]
    again = model.index()
    assert [s._lists[model.segments[0].id] for s in model.segments[1:]] == held
    assert again._tail is not None
    assert again._tail.count == index._tail.count


def test_a_filter_runs_its_sql_once_per_opened_version(model: Model) -> None:
    rng = np.random.default_rng(11)
    model.add(rng, 30)
    model.add(rng, 30)
    model.deleted.update({0, 3})
    index = model.index()
    queries = unit(rng, 4)
    first = index.nearest(queries, 5, filters={"tag": "red"})
    again = index.nearest(queries[::-1], 5, filters={"tag": {"in": ["red"]}})
    same = index.nearest(queries, 5, filters={"tag": "red"})
    assert (index.filtered.misses, index.filtered.hits) == (2, 1)  # two spellings, one reused
    for got in (first, same):
        np.testing.assert_array_equal(got[1], model.exact(queries, 5, tag="red")[1])
    np.testing.assert_array_equal(again[1], model.exact(queries[::-1], 5, tag="red")[1])
    assert not np.isin(first[1], [0, 3]).any()


@pytest.mark.parametrize("bitmap_max", [2**27, 8])
def test_allowed_ids_select_exactly_themselves(
    bitmap_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(allowed_module, "BITMAP_MAX_IDS", bitmap_max)
    ids = np.array([3, 9, 10, 64, 1000], dtype=np.int64)
    selector = AllowedIds(ids[::-1]).selector()
    kind = "IDSelectorBitmap" if bitmap_max > 1000 else "IDSelectorBatch"
    assert type(selector).__name__ == kind
    assert [i for i in range(1100) if selector.is_member(i)]  # type: ignore[attr-defined]  # swig, untyped == ids.tolist()
