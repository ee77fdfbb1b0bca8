"""The FAISS layer (``indexer.faiss_index``) and its benchmark, on real FAISS at small sizes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks import index_faiss
from benchmarks.index_faiss import faiss_bench
from indexer import faiss_index, faiss_search
from indexer.errors import IndexFileError
from indexer.faiss_choice import choose_factory, estimate_memory_bytes, ivf_nlist
from indexer.faiss_index import (
    build_index,
    get_search_params,
    index_bytes,
    load_index,
    remove_ids,
    save_index,
    set_search_params,
    supports_remove,
)
from indexer.faiss_search import exact_search, recall_at_k, recall_of, search
from indexer.synthetic_vectors import Mixture

faiss.omp_set_num_threads(1)  # the test machine's cores are shared

COUNT, DIM = 10_000, 64
NLIST = ivf_nlist(COUNT)
FACTORIES = {
    "flat": "Flat",
    "ivf": f"IVF{NLIST},Flat",
    "ivfpq": "IVF64,PQ16",
    "hnsw": "HNSW32",
}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered unit vectors, large non-contiguous ids, and queries from the same mixture."""
    mixture = Mixture(DIM, clusters=100, seed=3)
    vectors = mixture.sample(COUNT, seed=2)
    ids = np.arange(COUNT, dtype=np.int64) * 7_919 + 2**40
    queries = mixture.sample(200, seed=1)
    return vectors, ids, queries


@pytest.fixture(scope="module")
def indexes(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, faiss.Index]:
    vectors, ids, _ = data
    # 3,000 training vectors keep IVF-PQ's 16 k-means runs short; the others train as default.
    return {
        kind: build_index(vectors, ids, factory, train_sample=3_000, use_gpu=False)
        for kind, factory in FACTORIES.items()
    }


# --- choosing ----------------------------------------------------------------------------------


def test_choose_factory_follows_the_table() -> None:
    gib = 2**30
    assert choose_factory(10_000, 512) == "Flat"  # row 1: small
    assert choose_factory(0, 64) == "Flat"
    assert choose_factory(49_999, 256) == "Flat"
    nlist = ivf_nlist(200_000)
    assert nlist == int(4 * 200_000**0.5) == 1788
    assert choose_factory(200_000, 256) == f"IVF{nlist},Flat"  # row 3: medium
    assert choose_factory(200_000, 256, removable=False) == "HNSW32"  # row 2
    assert choose_factory(10_000_000, 256, removable=False) == f"IVF{ivf_nlist(10**7)},Flat"
    flat = estimate_memory_bytes(f"IVF{nlist},Flat", 200_000, 256)
    half = estimate_memory_bytes(f"IVF{nlist},SQfp16", 200_000, 256)
    assert choose_factory(200_000, 256, flat) == f"IVF{nlist},Flat"
    assert choose_factory(200_000, 256, flat - 1) == f"IVF{nlist},SQfp16"  # row 4
    assert choose_factory(200_000, 256, half - 1) == f"IVF{nlist},PQ64"  # row 5: over budget
    pq16 = estimate_memory_bytes(f"IVF{nlist},PQ16", 200_000, 256)
    assert choose_factory(200_000, 256, pq16) == f"IVF{nlist},PQ16"
    # A small collection that does not fit flat falls through to the compressed rows.
    assert choose_factory(10_000, 256, 5_000_000).startswith(f"IVF{ivf_nlist(10_000)},")
    # 100M vectors of dim 768: only PQ fits; m divides 768 and is at most 64 (bytes a vector).
    assert choose_factory(100_000_000, 768, 16 * gib) == "IVF40000,PQ64"
    assert choose_factory(100_000_000, 768, 6 * gib) == "IVF40000,PQ48"
    with pytest.raises(ValueError, match="no index"):
        choose_factory(200_000, 256, 1_000_000)  # row 6


def test_choose_factory_is_deterministic_and_clips_nlist() -> None:
    assert ivf_nlist(1_000) == 1_000 // 39  # enough training points a list
    assert ivf_nlist(10) == 1
    assert ivf_nlist(10**12) == 65_536
    assert choose_factory(123_456, 384) == choose_factory(123_456, 384)


def test_memory_estimate_matches_the_built_index(
    indexes: dict[str, faiss.Index],
) -> None:
    # IVF indexes hold no hash map, so the serialised size is their RAM: within 5 %.
    for kind in ("ivf", "ivfpq"):
        estimate = estimate_memory_bytes(FACTORIES[kind], COUNT, DIM)
        assert abs(estimate - index_bytes(indexes[kind])) / estimate < 0.05
    # Id-mapped indexes also keep a hash map that is rebuilt on load, never serialised.
    assert estimate_memory_bytes("Flat", COUNT, DIM) > index_bytes(indexes["flat"])
    with pytest.raises(ValueError, match="cannot estimate"):
        estimate_memory_bytes("LSH", 10, 8)


# --- building and searching ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_search_returns_our_ids_best_first(
    kind: str, indexes: dict[str, faiss.Index], data: tuple[np.ndarray, ...]
) -> None:
    vectors, ids, _ = data
    index = indexes[kind]
    assert index.ntotal == COUNT
    scores, found = search(index, vectors[:50], 10)
    assert scores.dtype == np.float32
    assert found.dtype == np.int64
    assert scores.shape == found.shape == (50, 10)
    assert np.isin(found, ids).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    # A database vector finds itself first (PQ's 16-byte codes: nearly always).
    self_hits = np.mean(found[:, 0] == ids[:50])
    assert self_hits >= (0.9 if kind == "ivfpq" else 1.0)


def test_default_search_params(indexes: dict[str, faiss.Index]) -> None:
    assert get_search_params(indexes["ivf"]) == {"nlist": NLIST, "nprobe": NLIST // 8}
    assert get_search_params(indexes["hnsw"]) == {"efSearch": 64}
    assert get_search_params(indexes["flat"]) == {}


@pytest.mark.parametrize(("kind", "floor"), [("flat", 1.0), ("ivf", 0.9), ("hnsw", 0.9)])
def test_recall_at_10_is_high_with_default_params(
    kind: str, floor: float, indexes: dict[str, faiss.Index], data: tuple[np.ndarray, ...]
) -> None:
    vectors, ids, queries = data
    assert recall_at_k(indexes[kind], vectors, ids, queries, k=10) >= floor


def test_search_params_trade_recall(
    indexes: dict[str, faiss.Index], data: tuple[np.ndarray, ...]
) -> None:
    vectors, ids, queries = data
    index = indexes["ivf"]
    try:
        set_search_params(index, nprobe=1)
        low = recall_at_k(index, vectors, ids, queries)
        set_search_params(index, nprobe=10**6)  # clipped to nlist: exhaustive
        assert get_search_params(index)["nprobe"] == NLIST
        assert recall_at_k(index, vectors, ids, queries) == pytest.approx(1.0)
        assert low < 0.9
    finally:
        set_search_params(index, nprobe=NLIST // 8)
    with pytest.raises(ValueError, match="ef_search applies to HNSW"):
        set_search_params(index, ef_search=10)


def test_exact_search_and_recall_helpers(data: tuple[np.ndarray, ...]) -> None:
    vectors, ids, queries = data
    scores, rows = exact_search(vectors[:5], queries[:3], 8)
    assert rows[:, :5].min() >= 0
    assert (rows[:, 5:] == -1).all()
    assert np.isneginf(scores[:, 5:]).all()
    brute = np.argsort(-(queries[:3] @ vectors[:5].T), axis=1)
    np.testing.assert_array_equal(rows[:, :5], brute)
    _, mapped = exact_search(vectors[:5], queries[:3], 2, ids=ids[:5])
    np.testing.assert_array_equal(mapped, ids[:5][brute[:, :2]])
    assert recall_of(np.array([[1, 2, -1]]), np.array([[2, 3, -1]])) == 0.5


# --- removing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_removed_ids_are_never_returned(kind: str, data: tuple[np.ndarray, ...]) -> None:
    vectors, ids, _ = data
    index = build_index(vectors[:4000], ids[:4000], FACTORIES[kind].replace(str(NLIST), "64"))
    assert supports_remove(index)
    doomed = ids[:4000:2]
    assert remove_ids(index, np.concatenate([doomed, [123]])) == len(doomed)  # 123: unknown
    assert index.ntotal == 4000 - len(doomed)
    assert remove_ids(index, doomed) == 0
    _, found = search(index, vectors[:4000:2], 10)  # the removed vectors themselves
    assert not np.isin(found, doomed).any()
    assert (found >= 0).all()
    kept = ids[1:4000:2]
    _, found = search(index, vectors[1:4000:2][:100], 1)
    np.testing.assert_array_equal(found[:, 0], kept[:100])  # survivors keep their ids


def test_hnsw_cannot_remove(indexes: dict[str, faiss.Index], data: tuple[np.ndarray, ...]) -> None:
    assert not supports_remove(indexes["hnsw"])
    with pytest.raises(ValueError, match="cannot remove"):
        remove_ids(indexes["hnsw"], data[1][:3])
    assert indexes["hnsw"].ntotal == COUNT
    assert supports_remove(indexes["ivfpq"])


# --- filtered search ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_filtered_search_returns_k_allowed_results(
    kind: str,
    indexes: dict[str, faiss.Index],
    data: tuple[np.ndarray, ...],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    vectors, ids, queries = data
    rng = np.random.default_rng(5)
    rows = np.sort(rng.choice(COUNT, size=15, replace=False))  # 15 of 10,000: very selective
    allowed = ids[rows]
    completions: list[int] = []
    original = faiss_search._exhaustive

    def spy(index: faiss.Index, q: np.ndarray, *args: Any) -> tuple[np.ndarray, np.ndarray]:
        completions.append(len(q))
        return original(index, q, *args)

    monkeypatch.setattr(faiss_search, "_exhaustive", spy)
    scores, found = search(indexes[kind], queries, 10, allowed=allowed)
    assert found.shape == (len(queries), 10)
    assert np.isin(found, allowed).all()  # exactly 10 results, every one allowed
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    if kind != "ivfpq":  # exact scores: the true top-10 of the allowed vectors
        _, expected = exact_search(vectors[rows], queries, 10, ids=allowed)
        assert recall_of(found, expected) == 1.0
    if kind == "hnsw":
        assert completions, "HNSW's graph walk should have come back short and been completed"
    if kind == "flat":
        assert not completions  # a filtered flat scan is already complete


@pytest.mark.parametrize("kind", list(FACTORIES))
def test_filtered_search_with_fewer_allowed_than_k(
    kind: str, indexes: dict[str, faiss.Index], data: tuple[np.ndarray, ...]
) -> None:
    _, ids, queries = data
    allowed = np.concatenate([ids[[3, 500, 7_000]], [5, 6]])  # 5 and 6 are not in the index
    scores, found = search(indexes[kind], queries[:20], 10, allowed=allowed)
    assert (np.sort(found[:, :3], axis=1) == np.sort(ids[[3, 500, 7_000]])).all()
    assert (found[:, 3:] == -1).all()
    assert np.isneginf(scores[:, 3:]).all()
    empty_scores, empty = search(indexes[kind], queries[:2], 4, allowed=np.array([], np.int64))
    assert (empty == -1).all()
    assert np.isneginf(empty_scores).all()


def test_filtered_search_uses_lookup_vectors(
    indexes: dict[str, faiss.Index], data: tuple[np.ndarray, ...]
) -> None:
    vectors, ids, queries = data
    row_of = {int(i): r for r, i in enumerate(ids)}
    allowed = ids[10:40]

    def lookup(wanted: np.ndarray) -> np.ndarray:
        return vectors[[row_of[int(i)] for i in wanted]]

    scores, found = search(indexes["hnsw"], queries, 10, allowed=allowed, lookup=lookup)
    expected_scores, expected = exact_search(vectors[10:40], queries, 10, ids=allowed)
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)


def test_post_filter_used_for_gpu_indexes(
    indexes: dict[str, faiss.Index], data: tuple[np.ndarray, ...]
) -> None:
    # GPU indexes take no ID selector: over-fetch and drop. Checked here on a CPU index.
    vectors, ids, queries = data
    allowed = np.sort(ids[::3])
    scores, found = faiss_search._post_filtered(indexes["flat"], queries, 10, allowed)
    expected_scores, expected = exact_search(vectors[::3], queries, 10, ids=ids[::3])
    np.testing.assert_array_equal(found, expected)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5)


# --- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_save_load_round_trip_is_atomic(
    kind: str, indexes: dict[str, faiss.Index], data: tuple[np.ndarray, ...], tmp_path: Path
) -> None:
    _, _, queries = data
    path = tmp_path / "vectors.faiss"
    path.write_bytes(b"an older version")
    save_index(indexes[kind], path)
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]  # no temporary file left
    loaded = load_index(path)
    assert get_search_params(loaded) == get_search_params(indexes[kind])
    for mmap in (False, True):
        loaded = load_index(path, mmap=mmap)
        expected = search(indexes[kind], queries, 10)
        got = search(loaded, queries, 10)
        np.testing.assert_array_equal(got[1], expected[1])
        np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)


def test_failed_save_leaves_the_old_file(
    indexes: dict[str, faiss.Index], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "vectors.faiss"
    save_index(indexes["flat"], path)
    before = path.read_bytes()

    def broken(*_: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_index(indexes["ivf"], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["vectors.faiss"]


def test_memory_mapped_index_is_read_only(
    indexes: dict[str, faiss.Index], data: tuple[np.ndarray, ...], tmp_path: Path
) -> None:
    vectors, ids, _ = data
    save_index(indexes["flat"], tmp_path / "flat.faiss")
    mapped = load_index(tmp_path / "flat.faiss", mmap=True)
    assert not supports_remove(mapped)
    with pytest.raises(ValueError, match="cannot remove"):
        remove_ids(mapped, ids[:2])
    with pytest.raises(ValueError, match="read-only"):
        faiss_index.add_vectors(mapped, vectors[:1], np.array([1], np.int64))
    copied = load_index(tmp_path / "flat.faiss")
    assert supports_remove(copied)
    assert remove_ids(copied, ids[:2]) == 2


def test_load_errors_are_clear(tmp_path: Path, indexes: dict[str, faiss.Index]) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_index(tmp_path / "missing.faiss")
    corrupt = tmp_path / "corrupt.faiss"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(IndexFileError, match="not a readable FAISS index"):
        load_index(corrupt)
    truncated = tmp_path / "truncated.faiss"
    save_index(indexes["ivf"], truncated)
    truncated.write_bytes(truncated.read_bytes()[:5_000])
    with pytest.raises(IndexFileError, match=r"truncated\.faiss"):
        load_index(truncated)
    l2 = tmp_path / "l2.faiss"
    faiss.write_index(faiss.IndexFlatL2(8), str(l2))
    with pytest.raises(IndexFileError, match="not inner product"):
        load_index(l2)


# --- input errors --------------------------------------------------------------------------------

Case = tuple[Callable[[np.ndarray, np.ndarray, np.ndarray], Any], str]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda v, i, q: build_index(v.astype(np.float64), i, "Flat"), "float32, not float64"),
        (lambda v, i, q: build_index(v[0], i[:1], "Flat"), "2-D"),
        (lambda v, i, q: build_index(v, i[:-1], "Flat"), "one id a vector"),
        (lambda v, i, q: build_index(v[:3], np.array([1, 1, 2]), "Flat"), "unique"),
        (lambda v, i, q: build_index(v[:2], np.array([-1, 2]), "Flat"), ">= 0"),
        (lambda v, i, q: build_index(v[:2], np.array([1.0, 2.0]), "Flat"), "integers"),
        (lambda v, i, q: build_index(v[:2] * 3, i[:2], "Flat"), "L2-normalised"),
        (lambda v, i, q: build_index(v[:2] * np.nan, i[:2], "Flat"), "NaN"),
        (lambda v, i, q: build_index(v[:2], i[:2], "Bogus7"), "cannot build factory"),
        (lambda v, i, q: build_index(v[:50], i[:50], "IVF256,Flat"), "needs at least 256"),
    ],
)
def test_build_errors_are_clear(
    call: Callable[..., Any], message: str, data: tuple[np.ndarray, ...]
) -> None:
    vectors, ids, queries = data
    with pytest.raises(ValueError, match=message):
        call(vectors, ids, queries)


def test_search_errors_are_clear(
    indexes: dict[str, faiss.Index], data: tuple[np.ndarray, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, queries = data
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)  # as on CI, also where there is one
    with pytest.raises(ValueError, match="dim 32, the index has dim 64"):
        search(indexes["flat"], np.ascontiguousarray(queries[:, :32]), 5)
    with pytest.raises(ValueError, match="float32"):
        search(indexes["flat"], queries.astype(np.float16), 5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        search(indexes["flat"], queries, 0)
    with pytest.raises(ValueError, match="use_gpu=True"):
        build_index(queries, np.arange(len(queries)), "Flat", use_gpu=True)


# --- benchmark -----------------------------------------------------------------------------------


def test_faiss_bench_reports_every_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_faiss, "MIN_SECONDS", 0.02)
    out = tmp_path / "faiss.json"
    args = ["--sizes", "3000", "--dim", "32", "--queries", "64", "--threads", "1"]
    result = CliRunner().invoke(faiss_bench, [*args, "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert [row["kind"] for row in rows] == ["flat", "ivf", "ivfpq", "hnsw"]
    by_kind = {row["kind"]: row for row in rows}
    assert by_kind["flat"]["recall_at_10"] == 1.0
    assert by_kind["ivf"]["factory"] == f"IVF{ivf_nlist(3000)},Flat"
    assert by_kind["ivfpq"]["factory"] == f"IVF{ivf_nlist(3000)},PQ8"
    assert by_kind["ivfpq"]["index_bytes"] < by_kind["ivf"]["index_bytes"] / 4
    assert all(row["qps_batch1"] > 0 and row["qps_batch64"] > 0 for row in rows)
    assert "| 3,000 | `HNSW32` |" in result.output


def test_mixture_is_seeded_clustered_and_normalised() -> None:
    mixture = Mixture(32, clusters=10, seed=1)
    a, b = mixture.sample(500, seed=4), Mixture(32, clusters=10, seed=1).sample(500, seed=4)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    nearest = np.sort(a @ a.T, axis=1)[:, -2]  # best other vector
    assert nearest.mean() > 0.8 > float(np.mean(a @ a.T))
