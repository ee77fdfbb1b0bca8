"""Compressed segments rescore ``k x r`` candidates exactly with their stored fp16 vectors.

The oracle is exact search in numpy: over the float32 originals where the point is that PQ
alone gets the order wrong, and over what the segments store (fp16 for lossy ones, float32 for
``Flat``) where every candidate is rescored, so the answer must be exact search over the live
(and matching) items' stored vectors, through every path a segment is searched by: plain,
tombstones over-fetched, tombstones skipped by a selector, filtered (exact over few matches or
inside the index), and an IVF-PQ base searched through the tail.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import indexer.segments as segments_module
from benchmarks.index_rescore import main as rescore_bench
from indexer.cli import index as index_cli
from indexer.collection import Collection
from indexer.faiss_index import set_search_params
from indexer.metadata import Item
from indexer.rescore import best_k
from indexer.segments import (
    DEFAULT_RESCORE,
    OVERFETCH_TOMBSTONES,
    RESCORE_STEPS,
    Segment,
    SegmentedIndex,
    default_rescore,
    merge_top_k,
    new_segment_id,
    rescores,
    write_segment,
)

DIM = 16
TAGS = ("red", "green", "blue")


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items_for(ids: np.ndarray) -> list[Item]:
    return [
        Item(id=int(i), kind="image", uri=f"u/{i}", group_id=f"g{i}",
             metadata={"tag": TAGS[int(i) % 3]})
        for i in ids
    ]  # fmt: skip


class Segments:
    """Segments written into a folder, opened as the service opens them (memory-mapped)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.opened: list[Segment] = []
        self.next_id = 0

    def add(self, vectors: np.ndarray, factory: str) -> Segment:
        ids = np.arange(self.next_id, self.next_id + len(vectors), dtype=np.int64)
        self.next_id += len(vectors)
        folder = self.folder / new_segment_id()
        write_segment(folder, ids, vectors, items_for(ids), factory)
        segment = Segment(folder, mmap=True)
        if segment.index is not None and "IVF" in factory:
            # Every list probed: the candidates are the codes' true top k x r.
            set_search_params(segment.index, nprobe=1 << 16)
        self.opened.append(segment)
        return segment

    def stored_exact(
        self, queries: np.ndarray, k: int, deleted: set[int], tag: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top k (score, then id) over the live, matching items' stored vectors."""
        ids = np.concatenate([s.ids for s in self.opened])
        vectors = np.concatenate([np.asarray(s.vectors(), np.float32) for s in self.opened])
        keep = np.array(
            [int(i) not in deleted and (tag is None or TAGS[int(i) % 3] == tag) for i in ids]
        )
        return best_k(queries @ vectors[keep].T, np.tile(ids[keep], (len(queries), 1)), k)


@pytest.fixture
def made(tmp_path: Path) -> Iterator[Segments]:
    segments = Segments(tmp_path)
    yield segments
    for segment in segments.opened:
        segment.close()


def near_duplicates(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """600 random vectors (PQ's training) then 24 near-duplicates of one direction, and 8
    queries near that direction: coarse PQ codes cannot order the duplicates."""
    centre = unit(rng.standard_normal((1, DIM)))
    duplicates = unit(centre + 0.1 * rng.standard_normal((24, DIM)))
    queries = unit(centre + 0.1 * rng.standard_normal((8, DIM)))
    return np.concatenate([unit(rng.standard_normal((600, DIM))), duplicates]), queries


def test_rescoring_returns_the_exact_top_k_where_pq_alone_gets_it_wrong(made: Segments) -> None:
    vectors, queries = near_duplicates(np.random.default_rng(0))
    segment = made.add(vectors, "IVF1,PQ2")
    index = SegmentedIndex([segment], np.zeros(0, np.int64))
    k = 5
    want_scores, want_ids = best_k(queries @ vectors.T, np.tile(segment.ids, (8, 1)), k)
    # The exact order is decided by more than fp16 can blur (about 1e-3 on a score).
    assert (np.diff(want_scores, axis=1) < -2e-3).mean() > 0.5
    _, pq_ids = index.nearest(queries, k, rescore=1)
    assert (pq_ids != want_ids).any(axis=1).mean() >= 0.5  # PQ alone: wrong in most rows
    scores, ids = index.nearest(queries, k, rescore=8)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-3)
    # The default is the measured one for the segment's size, and at least finds the same here.
    assert index.rescore is None
    assert default_rescore(segment.info.count) == DEFAULT_RESCORE
    np.testing.assert_array_equal(index.nearest(queries, k)[1], want_ids)


def test_rescoring_reads_the_fp16_copy_through_the_memory_map(
    made: Segments, monkeypatch: pytest.MonkeyPatch
) -> None:
    vectors, queries = near_duplicates(np.random.default_rng(1))
    segment = made.add(vectors, "IVF1,PQ2")
    stored = segment.vectors()
    assert isinstance(stored, np.memmap)
    assert stored.dtype == np.float16
    looked_up: list[np.ndarray] = []
    read_from: list[np.ndarray] = []
    lookup = segment.lookup

    def spy(ids: np.ndarray) -> np.ndarray:
        looked_up.append(np.array(ids))
        read_from.append(segment.vectors())
        return lookup(ids)

    monkeypatch.setattr(segment, "lookup", spy)
    index = SegmentedIndex([segment], np.zeros(0, np.int64))
    index.nearest(queries, 5, rescore=1)
    assert looked_up == []  # r = 1: the codes' scores, nothing read
    scores, ids = index.nearest(queries, 5, rescore=3)
    (asked,) = looked_up
    assert all(r is stored for r in read_from)  # the memory map, not a copy in RAM
    assert len(asked) <= len(queries) * 5 * 3  # only the candidates' rows
    assert np.isin(ids, asked).all()
    # The scores are the float32 inner products with the fp16 rows as stored.
    rows = np.searchsorted(segment.ids, ids)
    exact = np.einsum("qd,qkd->qk", queries, np.asarray(stored[rows], np.float32))
    np.testing.assert_allclose(scores, exact, rtol=0, atol=1e-6)


def several(made: Segments, rng: np.random.Generator) -> set[int]:
    """A PQ segment with many tombstones (the selector path), an SQ8 one with a few (the
    over-fetch path), an untouched PQ one and a Flat one; returns the tombstones."""
    big = made.add(unit(rng.standard_normal((700, DIM))), "IVF4,PQ4")
    few = made.add(unit(rng.standard_normal((400, DIM))), "IVF2,SQ8")
    made.add(unit(rng.standard_normal((300, DIM))), "IVF2,PQ8")
    made.add(unit(rng.standard_normal((50, DIM))), "Flat")
    deleted = set(big.ids[: OVERFETCH_TOMBSTONES + 60].tolist())
    return deleted | set(few.ids[::40].tolist())


@pytest.mark.parametrize("exact_filter_ids", [segments_module.EXACT_FILTER_IDS, 0])
def test_filters_tombstones_and_several_segments_answer_like_exact_over_what_is_stored(
    made: Segments, monkeypatch: pytest.MonkeyPatch, exact_filter_ids: int
) -> None:
    # 0: filtered searches go through the index with a selector, not exact over the matches.
    monkeypatch.setattr(segments_module, "EXACT_FILTER_IDS", exact_filter_ids)
    rng = np.random.default_rng(2)
    deleted = several(made, rng)
    index = SegmentedIndex(made.opened, np.array(sorted(deleted), dtype=np.int64))
    assert index._tail is not None  # the Flat segment rides on the largest IVF base
    queries = unit(rng.standard_normal((12, DIM)))
    for k in (1, 10):
        # k x r covers every segment: every live item is rescored, so the answer is exact.
        for tag in (None, "green"):
            scores, ids = index.nearest(
                queries, k, filters={"tag": tag} if tag else None, rescore=1024
            )
            want_scores, want_ids = made.stored_exact(queries, k, deleted, tag)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(scores, want_scores, atol=1e-5)
            assert not np.isin(ids, list(deleted)).any()


def test_the_default_factor_keeps_most_of_the_exact_answer(made: Segments) -> None:
    rng = np.random.default_rng(3)
    deleted = several(made, rng)
    index = SegmentedIndex(made.opened, np.array(sorted(deleted), dtype=np.int64))
    queries = unit(rng.standard_normal((40, DIM)))
    for tag in (None, "blue"):
        filters = {"tag": tag} if tag else None
        _, want = made.stored_exact(queries, 10, deleted, tag)
        overlap = [
            np.mean([np.isin(w, f).mean() for w, f in zip(want, found, strict=True)])
            for found in (
                index.nearest(queries, 10, filters=filters, rescore=1)[1],
                index.nearest(queries, 10, filters=filters)[1],
            )
        ]
        assert overlap[1] >= 0.95
        assert overlap[1] > overlap[0]  # rescoring is what recovers it


def test_a_row_with_k_candidates_is_rescored_not_searched_again_exhaustively(
    made: Segments, monkeypatch: pytest.MonkeyPatch
) -> None:
    """k x r candidates are wanted, k are needed: a filtered or tombstoned row that finds
    fewer than k x r but at least k is rescored as it is, not completed over every allowed id
    (which reads all of their stored rows)."""
    monkeypatch.setattr(segments_module, "EXACT_FILTER_IDS", 0)  # through the index
    rng = np.random.default_rng(4)
    segment = made.add(unit(rng.standard_normal((700, DIM))), "IVF4,PQ4")
    assert segment.index is not None
    set_search_params(segment.index, nprobe=1)  # one list of ~175: ~58 of each tag
    deleted = set(segment.ids[1 : OVERFETCH_TOMBSTONES + 100 : 3].tolist())  # > 256: selector
    index = SegmentedIndex([segment], np.array(sorted(deleted), dtype=np.int64))
    asked: list[int] = []
    lookup = segment.lookup

    def spy(ids: np.ndarray) -> np.ndarray:
        asked.append(len(ids))
        return lookup(ids)

    monkeypatch.setattr(segment, "lookup", spy)
    queries = unit(rng.standard_normal((2, DIM)))
    for filters in ({"tag": "red"}, None):
        asked.clear()
        _, ids = index.nearest(queries, 10, filters=filters, rescore=40)
        assert (ids >= 0).all()  # k found in the probed list: nothing to complete
        assert len(asked) == 1  # the rescoring's one read of its candidates' rows
        assert asked[0] < 2 * 175  # not every allowed or live id (~233 or ~540)


def test_only_codes_coarser_than_the_stored_copy_are_rescored() -> None:
    assert rescores("IVF64,PQ32")
    assert rescores("PQ16")
    assert rescores("IVF64,SQ8")
    assert not rescores("IVF64,SQfp16")  # codes as fine as the fp16 copy
    assert not any(rescores(f) for f in ("Flat", "IVF64,Flat", "HNSW32"))


def test_merge_breaks_score_ties_by_id_whatever_the_order_of_the_rows() -> None:
    a = (np.array([[0.9, 0.5, 0.5]], np.float32), np.array([[7, 9, 3]], np.int64))
    b = (np.array([[0.5, 0.5, -np.inf]], np.float32), np.array([[8, 1, -1]], np.int64))
    for rows in ([a, b], [b, a]):
        scores, ids = merge_top_k(rows, 1, 4)
        assert ids.tolist() == [[7, 1, 3, 8]]
        assert scores.tolist() == [[pytest.approx(0.9), 0.5, 0.5, 0.5]]
    scores, ids = merge_top_k([b], 1, 4)  # padded past what the rows hold
    assert ids.tolist() == [[1, 8, -1, -1]]
    assert np.isneginf(scores[0, 2:]).all()


def test_the_factor_is_checked_and_passed_down_from_collection_open(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="rescore must be a positive integer"):
        SegmentedIndex([], np.zeros(0, np.int64), rescore=0)
    index = SegmentedIndex([], np.zeros(0, np.int64), rescore=3)
    with pytest.raises(ValueError, match="rescore must be a positive integer"):
        index.nearest(np.zeros((1, DIM), np.float32), 3, rescore=-2)
    with pytest.raises(ValueError, match="rescore must be a positive integer"):
        Collection.open(tmp_path, "absent", rescore=0)


def test_the_rescoring_bench_reports_recall_rising_with_the_factor(tmp_path: Path) -> None:
    out = tmp_path / "rescore.json"
    budget = "0.1"  # MiB: only PQ fits 3,000 x 32
    arguments = ["--count", "3000", "--dim", "32", "--budgets-mib", budget, "--queries", "50"]
    result = CliRunner().invoke(rescore_bench, [*arguments, "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [row["rescore"] for row in rows] == [1, 2, 4, 8, 16]
    assert {row["factory"] for row in rows} == {"IVF76,PQ8"}
    recalls = [row["recall_at_10"] for row in rows]
    assert recalls[2] > recalls[0]  # r = 4 recovers what PQ codes lose
    assert min(recalls[1:]) >= recalls[0]
    assert "| `IVF76,PQ8` |" in result.output


def test_cots_index_search_takes_the_factor(tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(index_cli, ["search", "--help"])
    assert shown.exit_code == 0
    assert "--rescore" in shown.output
    query = ["search", "--root", str(tmp_path), "--collection", "c", "--text", "a red circle"]
    refused = runner.invoke(index_cli, [*query, "--rescore", "0"])
    assert refused.exit_code == 2
    assert "'--rescore': 0 is not in the range" in refused.output


def test_the_default_factor_grows_with_the_segment_as_measured() -> None:
    """docs/bench/scale.md: IVF-PQ32 at nprobe 64 needs r = 4 at 100k, 16 at 1M and 32 at 10M
    for recall@10 >= 0.95."""
    assert default_rescore(100_000) == DEFAULT_RESCORE == 4
    assert default_rescore(1_000_000) == 16
    assert default_rescore(10_000_000) == 32
    assert [factor for _, factor in RESCORE_STEPS] == sorted(f for _, f in RESCORE_STEPS)
