"""Changes to a collection that no other test proved (issue 21, item 7): compaction of Flat and
IVF collections answers like exact search over the live items; two changes publishing at once
both land, or one is refused cleanly, and no version is ever torn; a failed change leaves no
staging folder behind and changes nothing.

The vectors are random and the changes go through the real writers, as in
``tests/test_collection_changes.py``, whose helpers these tests share.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

import indexer.compaction as compaction
import indexer.update as update
from indexer.assemble import write_version
from indexer.collection import Collection, missing_files
from indexer.compaction import CompactionPolicy, compact_collection
from indexer.errors import CollectionError
from indexer.index_bundle import IndexInfo
from indexer.update import add_encoded, remove_from_collection
from indexer.versions import (
    VERSIONS,
    current_version,
    list_versions,
    publish,
    segments_dir,
    staging,
    version_dir,
)
from tests.test_collection_changes import DIM, NAME, add, items_for, unit
from tests.test_segments import exhaustive
from tests.versions import version_content, version_files

Truth = dict[int, np.ndarray]


def build_as(root: Path, vectors: np.ndarray, factory: str) -> Truth:
    """Version 1 of collection NAME: ``vectors`` (ids 0..n-1) in one segment of ``factory``."""
    ids = np.arange(len(vectors), dtype=np.int64)
    info = IndexInfo(
        collection=NAME, kind="image", modality="image", count=0, live=0, dim=DIM,
        factory=factory, model_bundle_id="b" * 64, recall_at_10=0.0, build={},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    with staging(root, NAME) as staged:
        write_version(staged, ids, vectors, items_for(ids), factory, info)
        publish(root, NAME, staged, keep=3)
    return dict(enumerate(vectors))


def remove(root: Path, truth: Truth, ids: list[int]) -> None:
    assert remove_from_collection(root, NAME, ids=ids)[1] == len(ids)
    for i in ids:
        del truth[i]


def exact_top(truth: Truth, queries: np.ndarray, k: int, odd_only: bool) -> np.ndarray:
    ids = np.array(sorted(i for i in truth if not odd_only or i % 2), dtype=np.int64)
    scores = queries @ np.stack([truth[int(i)] for i in ids]).T
    return ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]


def staging_folders(root: Path) -> list[str]:
    return sorted(p.name for p in (root / NAME / "versions").iterdir() if p.name.startswith("."))


# f. Compaction of Flat and IVF collections --------------------------------------------------


def _ivf_when_large(count: int, dim: int) -> str:
    """choose_factory with IVF from 312 vectors on (8 lists, 39 training points each), not
    50,000: a merged segment of these small collections is IVF itself."""
    return "IVF8,Flat" if count >= 8 * 39 else "Flat"


@pytest.mark.parametrize("full", [True, False], ids=["full", "policy"])
@pytest.mark.parametrize(
    ("base", "merged_ivf"),
    [("Flat", False), ("IVF8,Flat", False), ("IVF8,Flat", True)],
    ids=["flat", "ivf-base", "ivf-merged"],
)
def test_compaction_answers_like_exact_search_over_the_live_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: str, merged_ivf: bool, full: bool
) -> None:
    rng = np.random.default_rng(0)
    truth = build_as(tmp_path, unit(rng, 600), base)
    for n in (20, 15, 30):
        add(tmp_path, truth, unit(rng, n))
    # 30 % of the base and 5 of 15 of the second add: the policy rewrites those two segments;
    # 3 of the third add's 30 (10 %): below its ratio, kept as tombstones unless merging all.
    doomed = [*rng.choice(600, size=180, replace=False).tolist(), 620, 621, 622, 623, 624]
    remove(tmp_path, truth, [*doomed, 640, 650, 660])
    if merged_ivf:
        monkeypatch.setattr(compaction, "choose_factory", _ivf_when_large)
    assert compact_collection(tmp_path, NAME, policy=CompactionPolicy(full=full)) == 6
    with Collection.open(tmp_path, NAME) as live:
        factories = sorted(s.info.factory for s in live.segments.segments)
        big = "IVF8,Flat" if merged_ivf else "Flat"
        assert factories == ([big] if full else sorted([big, "Flat", "Flat", "Flat"]))
        assert live.info.tombstones == len(live.segments.deleted) == (0 if full else 3)
        assert live.info.live == len(truth) == 600 + 65 - 188
        exhaustive(live.segments)  # every IVF list probed: an IVF segment's answer is exact
        queries = unit(rng, 25)
        for odd_only in (False, True):
            _, found = live.nearest(queries, 10, filters={"odd": 1} if odd_only else None)
            np.testing.assert_array_equal(found, exact_top(truth, queries, 10, odd_only))
        assert live.get([*doomed[:3], 640]) == [None] * 4


# g. Two publishers racing -------------------------------------------------------------------


def _change(kind: str, root: Path, truth: Truth, rng: np.random.Generator) -> Callable[[], object]:
    """One change of ``kind`` to run in a thread; it updates ``truth`` when it lands."""
    if kind == "add":
        vectors = unit(rng, 6)
        return lambda: add(root, truth, vectors)
    if kind == "remove":
        doomed = rng.choice([i for i in truth if i >= 2], size=4, replace=False).tolist()
        return lambda: remove(root, truth, doomed)
    return lambda: compact_collection(root, NAME, policy=CompactionPolicy(full=True))


@pytest.mark.parametrize(
    "kinds",
    [("add", "remove"), ("add", "add"), ("add", "compact"), ("remove", "compact"),
     ("compact", "compact")],
    ids="-".join,
)  # fmt: skip
def test_two_changes_publishing_at_once_both_land_or_one_is_refused_and_none_is_torn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kinds: tuple[str, str]
) -> None:
    rng = np.random.default_rng(1)
    truth = build_as(tmp_path, unit(rng, 40), "Flat")
    add(tmp_path, truth, unit(rng, 10))
    remove(tmp_path, truth, [0, 1])  # version 3: two segments and tombstones to compact
    start = version_content(version_dir(tmp_path, NAME, 3))
    # Both changes reach publishing together: each waits there (up to 1 s) for the other. With
    # the collection's lock, the second waits for the lock instead and the first goes on alone.
    meet = threading.Barrier(2)
    real_publish = update.publish

    def publish_together(*args, **kwargs):  # type: ignore[no-untyped-def]
        with contextlib.suppress(threading.BrokenBarrierError):
            meet.wait(timeout=1)
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(update, "publish", publish_together)
    changes = [_change(kind, tmp_path, truth, rng) for kind in kinds]
    errors: list[BaseException] = []

    def run(change: Callable[[], object]) -> None:
        try:
            change()
        except BaseException as error:  # judged below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(change,)) for change in changes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if kinds == ("compact", "compact"):  # the second merged segments that are gone
        assert [type(e) for e in errors] == [CollectionError], errors
        assert "changed under the compaction" in str(errors[0])
    else:
        assert errors == []
    landed = 2 - len(errors)
    assert current_version(tmp_path, NAME) == 3 + landed
    assert list_versions(tmp_path, NAME)[-landed:] == list(range(4, 4 + landed))
    # Neither change undid the other: a compaction leaves one segment of the two it found, and
    # each add one more (a compaction overwritten by a change that read the version before it
    # holds the same items, but not its merge).
    with Collection.open(tmp_path, NAME, with_indexes=False) as final:
        merged = "compact" in kinds
        assert len(final.info.segments) == (1 if merged else 2) + kinds.count("add")
    # Every version is whole (opens, its files match their digests) and holds what a change
    # made of the one before: the first to publish alone, or both.
    final_ids = np.array(sorted(truth), dtype=np.int64)
    for version in list_versions(tmp_path, NAME):
        folder = version_dir(tmp_path, NAME, version)
        assert missing_files(tmp_path, NAME, folder) == []
        with Collection.open(tmp_path, NAME, version=version):
            pass
        ids, vectors, rows = version_content(folder)
        if version == 3 + landed:
            np.testing.assert_array_equal(ids, final_ids)
            np.testing.assert_array_equal(vectors, np.stack([truth[int(i)] for i in ids]))
            assert [row["uri"] for row in rows] == [f"u/{i}" for i in ids]
        elif version > 3:  # one change alone: every item in the start or in the end state
            live_then = set(ids.tolist())
            assert live_then <= set(start[0].tolist()) | set(truth)
            assert set(start[0].tolist()) & set(truth) <= live_then
    assert staging_folders(tmp_path) == []
    named = set()
    for version in list_versions(tmp_path, NAME):
        with Collection.open(tmp_path, NAME, version=version, with_indexes=False) as opened:
            named.update(opened.info.segments)
    assert {p.name for p in segments_dir(tmp_path, NAME).iterdir()} == named


# h. A failed change cleans its staging folder -----------------------------------------------


def _fail(failure: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Start the change ``failure`` names and make it fail where it says."""
    rng = np.random.default_rng(2)
    ids = np.arange(100, 104, dtype=np.int64)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    if failure == "add, writing its segment":  # items that are not the vectors' ids
        add_encoded(root, NAME, ids, unit(rng, 4), items_for(ids[:3]))
    elif failure == "add, joining the live version":  # the segment is written, then refused
        narrow = rng.standard_normal((4, 8)).astype(np.float32)
        narrow /= np.linalg.norm(narrow, axis=1, keepdims=True)
        add_encoded(root, NAME, ids, narrow, items_for(ids))
    elif failure == "add, publishing":
        monkeypatch.setattr(update, "publish", disk_full)
        add_encoded(root, NAME, ids, unit(rng, 4), items_for(ids))
    elif failure == "add, moving its version into place":  # its segment moved already
        real_rename = Path.rename

        def rename(self: Path, target: Path) -> Path:
            if Path(target).parent.name == VERSIONS:
                disk_full()
            return real_rename(self, target)

        monkeypatch.setattr(Path, "rename", rename)
        add_encoded(root, NAME, ids, unit(rng, 4), items_for(ids))
    elif failure == "remove, publishing":
        monkeypatch.setattr(update, "publish", disk_full)
        remove_from_collection(root, NAME, ids=[3, 4])
    else:  # "compact, after writing its merged segment"
        real = compaction.write_segment

        def written_then_full(*args, **kwargs):  # type: ignore[no-untyped-def]
            real(*args, **kwargs)
            disk_full()

        monkeypatch.setattr(compaction, "write_segment", written_then_full)
        compact_collection(root, NAME, policy=CompactionPolicy(full=True))


@pytest.mark.parametrize(
    ("failure", "error", "message"),
    [
        ("add, writing its segment", ValueError, "items must be exactly"),
        ("add, joining the live version", CollectionError, "cannot join"),
        ("add, publishing", OSError, "No space left"),
        ("add, moving its version into place", OSError, "No space left"),
        ("remove, publishing", OSError, "No space left"),
        ("compact, after writing its merged segment", OSError, "No space left"),
    ],
)
def test_a_failed_change_leaves_no_staging_folder_and_changes_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
    error: type[Exception],
    message: str,
) -> None:
    rng = np.random.default_rng(3)
    truth = build_as(tmp_path, unit(rng, 30), "Flat")
    add(tmp_path, truth, unit(rng, 5))
    remove(tmp_path, truth, [0])

    def state() -> tuple[int | None, list[int], list[str], dict[str, bytes]]:
        segments = sorted(p.name for p in segments_dir(tmp_path, NAME).iterdir())
        live = version_dir(tmp_path, NAME, current_version(tmp_path, NAME) or 0)
        versions = list_versions(tmp_path, NAME)
        return current_version(tmp_path, NAME), versions, segments, version_files(live)

    before = state()
    with pytest.raises(error, match=message):
        _fail(failure, tmp_path, monkeypatch)
    assert staging_folders(tmp_path) == []
    assert state() == before
