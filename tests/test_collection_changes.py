"""Changes to a live collection through the real writers (``add_encoded``,
``remove_from_collection``, ``compact_collection``): every version answers like exact search
over its live items, a change costs what it changes, and changes that run at once compose.

The vectors are random (no encoder): ``add_to_collection`` is ``reserve_numbers`` + the
encoder + ``add_encoded``, and only the last two write anything.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import indexer.compaction as compaction
import indexer.digests as digests
from benchmarks.index_updates import updates_bench
from indexer.assemble import write_version
from indexer.collection import Collection, missing_files
from indexer.compaction import CompactionPolicy, compact_collection, plan
from indexer.digests import check_file
from indexer.errors import CollectionError
from indexer.index_bundle import IndexInfo, read_info
from indexer.metadata import Item
from indexer.update import add_encoded, remove_from_collection
from indexer.versions import (
    current_dir,
    list_versions,
    publish,
    reserve_numbers,
    segments_dir,
    staging,
    version_dir,
)
from tests.versions import version_content, version_files

DIM = 16
NAME = "c"


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items_for(ids: np.ndarray) -> list[Item]:
    return [
        Item(id=int(i), kind="image", uri=f"u/{i}", group_id=f"g{i}", metadata={"odd": int(i) % 2})
        for i in ids
    ]


def build(root: Path, vectors: np.ndarray) -> None:
    ids = np.arange(len(vectors), dtype=np.int64)
    info = IndexInfo(
        collection=NAME, kind="image", modality="image", count=0, live=0, dim=DIM,
        factory="Flat", model_bundle_id="b" * 64, recall_at_10=0.0, build={},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    with staging(root, NAME) as staged:
        write_version(staged, ids, vectors, items_for(ids), "Flat", info)
        publish(root, NAME, staged, keep=2)


def add(root: Path, truth: dict[int, np.ndarray], vectors: np.ndarray) -> int:
    """What ``add_to_collection`` does around its encoder (ids after the largest ever given)."""
    floor = read_info(current_dir(root, NAME)).max_id + 1
    first = reserve_numbers(root, NAME, len(vectors), floor)
    ids = np.arange(first, first + len(vectors), dtype=np.int64)
    truth.update(zip(ids.tolist(), vectors, strict=True))
    return add_encoded(root, NAME, ids, vectors, items_for(ids), keep_versions=2)


def assert_like_exact(root: Path, truth: dict[int, np.ndarray], queries: np.ndarray) -> None:
    with Collection.open(root, NAME) as live:
        assert live.info.live == len(truth)
        assert missing_files(root, NAME, live.folder) == []
        for filters in (None, {"odd": 1}):
            ids = np.array(
                sorted(i for i in truth if filters is None or i % 2 == 1), dtype=np.int64
            )
            k = 7
            _, found = live.nearest(queries, k, filters=filters)
            if not len(ids):
                assert (found == -1).all()
                continue
            sims = queries @ np.stack([truth[int(i)] for i in ids]).T
            want = ids[np.argsort(-sims, axis=1, kind="stable")[:, :k]]
            np.testing.assert_array_equal(found[:, : want.shape[1]], want)
        hits = live.search(queries, 3)
        assert all(hit.item.uri == f"u/{hit.id}" for row in hits for hit in row)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 30)),
        st.tuples(st.just("remove"), st.sampled_from([0.1, 0.5])),
        st.tuples(st.just("remove-odd"), st.just(0)),
        st.tuples(st.just("compact"), st.sampled_from([0, 1, 3])),
    ),
    min_size=1,
    max_size=7,
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, seed=st.integers(0, 2**16))
def test_random_changes_always_answer_like_exact_search_over_the_live_items(
    tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, float]], seed: int
) -> None:
    root = tmp_path_factory.mktemp("changes")
    rng = np.random.default_rng(seed)
    start = unit(rng, 40)
    build(root, start)
    truth = dict(enumerate(start))
    queries = unit(rng, 5)
    for op, amount in ops:
        if op == "add":
            add(root, truth, unit(rng, int(amount)))
        elif op == "remove":
            live = sorted(truth)
            doomed = rng.choice(live, size=int(len(live) * amount), replace=False)
            if len(doomed):
                remove_from_collection(root, NAME, ids=[int(i) for i in doomed], keep_versions=2)
                for i in doomed:
                    truth.pop(int(i))
        elif op == "remove-odd":
            _, removed = remove_from_collection(root, NAME, filters={"odd": 1}, keep_versions=2)
            assert removed == sum(1 for i in truth if i % 2)
            truth = {i: v for i, v in truth.items() if i % 2 == 0}
        else:
            # 0: full; otherwise the policy with that many segments allowed.
            policy = CompactionPolicy(full=amount == 0, max_segments=max(1, int(amount)))
            compact_collection(root, NAME, keep_versions=2, policy=policy)
        assert_like_exact(root, truth, queries)
    # Only the segments the two kept versions name are on disk.
    named = set()
    for version in list_versions(root, NAME):
        with Collection.open(root, NAME, version=version, with_indexes=False) as opened:
            named.update(opened.info.segments)
    assert {p.name for p in segments_dir(root, NAME).iterdir()} == named


def test_an_add_writes_only_what_it_adds(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    build(tmp_path, unit(rng, 3000))
    before = sum(p.stat().st_size for p in (tmp_path / NAME).rglob("*") if p.is_file())
    add(tmp_path, dict(enumerate(unit(rng, 3000))), unit(rng, 10))
    after = sum(p.stat().st_size for p in (tmp_path / NAME).rglob("*") if p.is_file())
    # A 10-item segment and a manifest: kilobytes, against ~500 kB for the 3,000 items.
    assert after - before < 60_000
    with Collection.open(tmp_path, NAME) as live:
        assert [s.info.count for s in live.segments.segments] == [3000, 10]


def test_adds_at_once_compose_and_never_share_an_id(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    build(tmp_path, unit(rng, 20))
    truth = dict(enumerate(unit(rng, 20)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def one(vectors: np.ndarray) -> None:
        try:
            with lock:
                first = reserve_numbers(tmp_path, NAME, len(vectors), 20)
            ids = np.arange(first, first + len(vectors), dtype=np.int64)
            add_encoded(tmp_path, NAME, ids, vectors, items_for(ids))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=one, args=(unit(rng, 5),)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with Collection.open(tmp_path, NAME) as live:
        assert live.info.count == live.info.live == 20 + 6 * 5
        ids = np.concatenate([s.ids for s in live.segments.segments])
        assert len(np.unique(ids)) == len(ids) == 50
    assert truth  # the first 20 are untouched


def test_a_compaction_composes_with_an_add_that_published_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(2)
    build(tmp_path, unit(rng, 30))
    truth = dict(enumerate(unit(rng, 30)))
    for _ in range(3):
        add(tmp_path, truth, unit(rng, 4))
    remove_from_collection(tmp_path, NAME, ids=[0, 31])
    real = compaction.write_segment
    late = unit(rng, 2)

    def meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        add(tmp_path, truth, late)  # publishes while the compaction writes its segment
        monkeypatch.setattr(compaction, "write_segment", real)
        return real(*args, **kwargs)

    monkeypatch.setattr(compaction, "write_segment", meanwhile)
    compact_collection(tmp_path, NAME, policy=CompactionPolicy(full=True))
    with Collection.open(tmp_path, NAME) as live:
        counts = [s.info.count for s in live.segments.segments]
        assert sorted(counts) == [2, 30 + 12 - 2]  # the merged one and the late add
        assert live.info.live == 30 + 12 + 2 - 2
        assert live.info.tombstones == 0
        assert live.get([0, 31]) == [None, None]


def test_a_compaction_that_lost_its_segments_to_another_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    build(tmp_path, unit(rng, 30))
    add(tmp_path, dict(enumerate(unit(rng, 30))), unit(rng, 4))
    real = compaction.write_segment

    def meanwhile(*args, **kwargs):  # type: ignore[no-untyped-def]
        monkeypatch.setattr(compaction, "write_segment", real)
        compact_collection(tmp_path, NAME, policy=CompactionPolicy(full=True))
        return real(*args, **kwargs)

    monkeypatch.setattr(compaction, "write_segment", meanwhile)
    live_before = None
    with pytest.raises(CollectionError, match="changed under the compaction"):
        live_before = compact_collection(tmp_path, NAME, policy=CompactionPolicy(full=True))
    assert live_before is None
    assert not [p for p in (tmp_path / NAME / "versions").iterdir() if p.name.startswith(".")]
    with Collection.open(tmp_path, NAME) as live:
        assert [s.info.count for s in live.segments.segments] == [34]
    assert current_dir(tmp_path, NAME).name == "000003"


def test_the_policy_merges_the_small_tail_and_rewrites_segments_with_many_tombstones() -> None:
    policy = CompactionPolicy(max_segments=4)
    assert plan([1000, 5, 5, 5], [0, 0, 0, 0], policy) == []  # within max_segments
    assert plan([1000, 5, 5, 5, 5], [0, 0, 0, 0, 0], policy) == [[1, 2, 3, 4]]
    assert plan([1000, 200, 5, 5, 5], [0, 0, 0, 0, 0], policy) == [[2, 3, 4]]
    assert plan([1000, 200], [300, 0], policy) == [[0]]  # 30 % removed
    assert plan([1000, 200], [100, 0], policy) == []  # 10 %: below the ratio
    assert plan([10], [0], CompactionPolicy(full=True)) == []  # one clean segment: nothing
    assert plan([10, 3], [0, 0], CompactionPolicy(full=True)) == [[0, 1]]


KILLED_COMPACTION = """
import sys, time
from pathlib import Path
import indexer.compaction as c
real = c.write_segment
def slow(*args, **kwargs):
    written = real(*args, **kwargs)
    print("segment written", flush=True)
    time.sleep(60)  # killed here: the merged segment is written, nothing is published
    return written
c.write_segment = slow
c.compact_collection(Path(sys.argv[1]), sys.argv[2], policy=c.CompactionPolicy(full=True))
"""


def test_a_compaction_killed_mid_way_leaves_the_old_version_and_reruns_to_the_same_content(
    tmp_path: Path,
) -> None:
    roots = [tmp_path / "killed", tmp_path / "straight"]
    for root in roots:
        build(root, unit(np.random.default_rng(4), 60))
        truth = dict(enumerate(unit(np.random.default_rng(4), 60)))
        add(root, truth, unit(np.random.default_rng(5), 7))
        remove_from_collection(root, NAME, ids=[1, 2, 61])
    killed, straight = roots
    before = version_files(current_dir(killed, NAME))
    process = subprocess.Popen(
        [sys.executable, "-c", KILLED_COMPACTION, str(killed), NAME],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "segment written"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # The old version is still live and whole; no half-made version is.
    assert current_dir(killed, NAME).name == "000003"
    assert version_files(current_dir(killed, NAME)) == before
    with Collection.open(killed, NAME) as live:
        assert live.info.tombstones == 3
    # Run again: the same content as a compaction never interrupted.
    compact_collection(killed, NAME, policy=CompactionPolicy(full=True))
    compact_collection(straight, NAME, policy=CompactionPolicy(full=True))
    (ids_a, vectors_a, items_a), (ids_b, vectors_b, items_b) = (
        version_content(current_dir(killed, NAME)),
        version_content(current_dir(straight, NAME)),
    )
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_array_equal(vectors_a, vectors_b)
    assert items_a == items_b
    assert 1 not in ids_a.tolist()


def test_the_updates_bench_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "updates.json"
    args = ["--count", "3000", "--dim", "32", "--changes", "40", "--queries", "10"]
    result = CliRunner().invoke(
        updates_bench, [*args, "--work", str(tmp_path / "w"), "--json-out", str(out)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["replica_loaded_segments"] == 1
    assert set(data["search_p50_ms"]) == {"2", "10", "50"}  # after one add there are two
    assert data["add_disk_bytes"] > 0
    assert data["remove_disk_bytes"] < data["add_disk_bytes"]
    assert data["search_p50_ms_compacted"] > 0
    side = data["search_p50_ms_side_by_side"]
    assert side["10"] > 0
    assert side["compacted"] > 0
    assert data["goals"]["search_10_over_compacted"] == round(side["10"] / side["compacted"], 2)
    assert "| full compaction |" in result.output
    assert "| side by side, query by query: 10 segments / compacted |" in result.output


def test_publishing_deletes_staging_folders_a_killed_change_left_a_day_ago(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(6)
    build(tmp_path, unit(rng, 10))
    versions = tmp_path / NAME / "versions"
    old, fresh = versions / ".staging-old", versions / ".staging-fresh"
    for folder in (old, fresh):
        (folder / "segments" / "x").mkdir(parents=True)
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    add(tmp_path, dict(enumerate(unit(rng, 10))), unit(rng, 2))
    assert not old.exists()
    assert fresh.exists()  # maybe a change still being written


def test_every_version_carries_the_digest_of_every_file_it_reads(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    build(tmp_path, unit(rng, 50))
    truth = dict(enumerate(unit(rng, 50)))
    first = read_info(current_dir(tmp_path, NAME))
    add(tmp_path, truth, unit(rng, 5))
    remove_from_collection(tmp_path, NAME, ids=[1, 2], keep_versions=3)
    for version in list_versions(tmp_path, NAME):
        folder = version_dir(tmp_path, NAME, version)
        info = read_info(folder)
        assert set(info.files) == set(version_files(folder)) - {"index.json"}
        for key, digest in info.files.items():
            path = folder / key if key == "deleted.npy" else tmp_path / NAME / key
            check_file(path, digest, key)
    # The base segment was hashed once, when it was written: later versions copy its entries.
    last = read_info(current_dir(tmp_path, NAME))
    base = first.segments[0]
    assert {k: v for k, v in last.files.items() if base in k} == {
        k: v for k, v in first.files.items() if base in k
    }
    compact_collection(tmp_path, NAME, keep_versions=3, policy=CompactionPolicy(full=True))
    compacted = current_dir(tmp_path, NAME)
    assert set(read_info(compacted).files) == set(version_files(compacted)) - {"index.json"}


def _flip_last_byte(path: Path, *, keep_mtime: bool) -> None:
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_a_damaged_file_is_refused_and_large_ones_are_trusted_on_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(8)
    build(tmp_path, unit(rng, 50))
    (segment,) = read_info(current_dir(tmp_path, NAME)).segments
    vectors = segments_dir(tmp_path, NAME) / segment / "vectors.npy"
    # Below the fast path's size every byte is read: a same-size change with the old mtime
    # restored is still caught.
    _flip_last_byte(vectors, keep_mtime=True)
    with pytest.raises(CollectionError, match=r"vectors.npy does not match its SHA-256"):
        Collection.open(tmp_path, NAME)
    # At or above it, an unchanged size and mtime are trusted (the documented fast path) ...
    monkeypatch.setattr(digests, "FAST_PATH_BYTES", 1)
    Collection.open(tmp_path, NAME).close()
    # ... and a rewrite, which moves the mtime, is hashed and refused.
    _flip_last_byte(vectors, keep_mtime=False)
    _flip_last_byte(vectors, keep_mtime=False)  # back to the damaged bytes, a newer mtime
    with pytest.raises(CollectionError, match=r"vectors.npy does not match its SHA-256"):
        Collection.open(tmp_path, NAME)
    vectors.write_bytes(b"short")
    with pytest.raises(CollectionError, match=r"has 5 bytes where index.json recorded"):
        Collection.open(tmp_path, NAME)
    vectors.unlink()
    with pytest.raises(CollectionError, match=r"vectors.npy is missing"):
        Collection.open(tmp_path, NAME)


def test_a_version_written_before_checksums_is_read_unchecked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(9)
    build(tmp_path, unit(rng, 20))
    index_json = current_dir(tmp_path, NAME) / "index.json"
    manifest = json.loads(index_json.read_text())
    del manifest["files"]
    index_json.write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="cots.index"), Collection.open(tmp_path, NAME) as old:
        assert old.info.live == 20
    assert "carries no file checksums" in caplog.text
    # The next change seals it: the segment's own record is trusted from then on.
    add(tmp_path, dict(enumerate(unit(rng, 20))), unit(rng, 3))
    sealed = current_dir(tmp_path, NAME)
    assert set(read_info(sealed).files) == set(version_files(sealed)) - {"index.json"}


def _indexed_fields(segment: Path) -> set[str]:
    with sqlite3.connect(segment / "metadata.sqlite") as conn:
        names = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
    return {
        name.removeprefix("items_field_") for (name,) in names if name.startswith("items_field_")
    }


def test_fields_indexed_at_build_are_indexed_in_every_later_segment(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    ids = np.arange(30, dtype=np.int64)
    info = IndexInfo(
        collection=NAME, kind="image", modality="image", count=0, live=0, dim=DIM,
        factory="Flat", model_bundle_id="b" * 64, recall_at_10=0.0,
        build={"index_fields": ["odd"]}, created=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    with staging(tmp_path, NAME) as staged:
        write_version(staged, ids, unit(rng, 30), items_for(ids), "Flat", info)
        publish(tmp_path, NAME, staged, keep=2)
    add(tmp_path, {}, unit(rng, 4))
    compact_collection(tmp_path, NAME, keep_versions=2, policy=CompactionPolicy(full=True))
    add(tmp_path, {}, unit(rng, 4))
    segments = read_info(current_dir(tmp_path, NAME)).segments
    assert len(segments) == 2
    for segment in segments:
        assert _indexed_fields(segments_dir(tmp_path, NAME) / segment) == {"odd"}
    with Collection.open(tmp_path, NAME) as live:
        assert live.ids_matching({"odd": {"in": [1]}}).tolist() == list(range(1, 38, 2))
