"""The index bundle's SQLite metadata store, on real files under tmp_path; nothing is mocked."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from indexer.errors import MetadataStoreError
from indexer.metadata import SCHEMA_VERSION, Item, MetadataStore


def _items(n: int, start: int = 0) -> list[Item]:
    """``n`` items cycling through every kind, with metadata of every JSON scalar type."""
    kinds = ("image", "caption", "video", "segment")
    out = []
    for i in range(start, start + n):
        kind = kinds[i % 4]
        out.append(
            Item(
                id=i,
                kind=kind,
                uri=f"s3://bucket/{i // 4}.{'mp4' if kind in ('video', 'segment') else 'jpg'}",
                caption=f"caption {i}" if kind == "caption" else None,
                group_id=f"g{i // 4}",
                metadata={
                    "split": "train" if i % 2 else "val",
                    "n": i % 3,
                    "w": i % 5 / 2,
                    "ok": i % 2 == 0,
                },
                start_s=float(i) if kind == "segment" else None,
                end_s=float(i) + 2.5 if kind == "segment" else None,
            )
        )
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetadataStore]:
    with MetadataStore.create(tmp_path / "meta.sqlite") as s:
        s.add(_items(40))
        yield s


def test_round_trip_all_fields(tmp_path: Path) -> None:
    path = tmp_path / "meta.sqlite"
    items = [
        Item(
            id=7,
            kind="segment",
            uri="file:///videos/ünïcode clip.mp4",
            caption="猫が 🐈 ピアノを弾く — «quoted» 'single' \"double\"",
            group_id="vidéo-1",
            metadata={"nested": {"a": [1, 2.5, None, {"b": True}]}, "tag": "日本", "f": 0.1},
            start_s=1.25,
            end_s=4.0,
        ),
        Item(id=2**62, kind="image", uri="a.jpg", group_id="a"),
    ]
    with MetadataStore.create(path) as s:
        s.add(items)
        assert s.get([7, 2**62]) == items
    with MetadataStore.open(path) as s:
        assert s.readonly
        got = s.get([2**62, 7])
        assert got == items[::-1]
        assert got[1] is not None
        assert got[1].metadata["nested"]["a"][3] == {"b": True}
        assert got[0] is not None
        assert (got[0].caption, got[0].metadata, got[0].start_s) == (None, {}, None)
        assert (s.count(), s.live_count(), s.max_id()) == (2, 2, 2**62)


def test_journal_mode_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "meta.sqlite"
    MetadataStore.create(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        assert meta["schema_version"] == str(SCHEMA_VERSION)
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type='index'")}
        assert {"items_group_id", "items_kind"} <= indexes
    finally:
        conn.close()
    assert not (tmp_path / "meta.sqlite-wal").exists()


def test_get_order_missing_removed_and_numpy_ids(store: MetadataStore) -> None:
    assert store.remove([5, 6]) == 2
    ids = np.array([9, -1, 5, 0, 1000, 9, 6, 3], dtype=np.int64)
    got = store.get(ids)
    assert [None if g is None else g.id for g in got] == [9, None, None, 0, None, 9, None, 3]
    assert store.get([]) == []


def test_get_is_one_statement(store: MetadataStore) -> None:
    store.add(_items(600, start=40))
    statements: list[str] = []
    # The connection is private; tracing it is the only way to see the SQL that get() runs.
    store._conn.set_trace_callback(statements.append)
    try:
        ids = list(range(639, 139, -1))  # 500 ids, descending
        got = store.get(ids)
    finally:
        store._conn.set_trace_callback(None)
    assert len(statements) == 1
    assert [g.id for g in got if g is not None] == ids


def test_get_beyond_the_variable_limit_is_still_one_statement(tmp_path: Path) -> None:
    with MetadataStore.create(tmp_path / "m.sqlite") as s:
        # Lowering the connection's limit stands in for a batch larger than the default one.
        s._conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 100)
        n = 1000
        s.add([Item(id=i, kind="image", uri="u", group_id="g") for i in range(n)])
        statements: list[str] = []
        s._conn.set_trace_callback(statements.append)
        got = s.get(np.arange(n)[::-1])
        removed = s.remove(np.arange(0, n, 2))
        s._conn.set_trace_callback(None)
        assert len(statements) == 2
        assert [g.id for g in got if g is not None] == list(range(n - 1, -1, -1))
        assert removed == n // 2


def test_duplicate_ids_are_refused_by_id(store: MetadataStore) -> None:
    with pytest.raises(ValueError, match="item id 12 is already in"):
        store.add(_items(1, start=40) + _items(1, start=12))
    # The failed batch left nothing behind, not even its new id.
    assert store.count() == 40
    assert store.get([40]) == [None]
    with pytest.raises(ValueError, match="item id 41 appears twice"):
        store.add(_items(2, start=41) + _items(1, start=41))
    # A removed id stays taken: FAISS may still hold its vector.
    store.remove([3])
    with pytest.raises(ValueError, match="item id 3 is already in"):
        store.add(_items(1, start=3))


def test_remove_removed_ids_and_counts(store: MetadataStore) -> None:
    assert store.remove(np.array([1, 2, 3, 999], dtype=np.int64)) == 3
    assert store.remove([2, 3, 4]) == 1  # only 4 was still live
    assert store.remove([]) == 0
    removed = store.removed_ids()
    assert removed.dtype == np.int64
    assert removed.tolist() == [1, 2, 3, 4]
    assert (store.count(), store.live_count(), store.max_id()) == (40, 36, 39)
    assert [it.id for it in store.iter_items(batch=7)] == [0, *range(5, 40)]


def test_empty_store(tmp_path: Path) -> None:
    with MetadataStore.create(tmp_path / "m.sqlite") as s:
        assert (s.count(), s.live_count(), s.max_id()) == (0, 0, -1)
        assert s.removed_ids().dtype == np.int64
        assert s.removed_ids().size == 0
        assert s.ids_matching({}).size == 0
        assert list(s.iter_items()) == []


def _expected(store: MetadataStore, pred: Any) -> list[int]:
    return [it.id for it in store.iter_items() if pred(it)]


def test_filters_on_columns_and_metadata(store: MetadataStore) -> None:
    store.remove([0])
    cases: list[tuple[dict[str, Any], Any]] = [
        ({}, lambda it: True),
        ({"kind": "image"}, lambda it: it.kind == "image"),
        ({"group_id": "g3"}, lambda it: it.group_id == "g3"),
        ({"uri": "s3://bucket/2.mp4"}, lambda it: it.uri == "s3://bucket/2.mp4"),
        ({"split": "train"}, lambda it: it.metadata["split"] == "train"),
        ({"n": 2}, lambda it: it.metadata["n"] == 2),
        ({"w": 1.5}, lambda it: it.metadata["w"] == 1.5),
        ({"w": 1}, lambda it: it.metadata["w"] == 1),  # int 1 matches the JSON real 1.0
        ({"ok": True}, lambda it: it.metadata["ok"] is True),
        ({"ok": False}, lambda it: it.metadata["ok"] is False),
        (
            {"kind": "segment", "split": "train", "n": 0},
            lambda it: (
                it.kind == "segment" and it.metadata["split"] == "train" and it.metadata["n"] == 0
            ),
        ),
    ]
    for filters, pred in cases:
        got = store.ids_matching(filters)
        assert got.dtype == np.int64
        expected = _expected(store, pred)
        assert got.tolist() == expected, filters
        assert 0 not in expected  # removed items never match
    for no_match in (
        {"kind": "video", "group_id": "g0", "split": "nope"},
        {"missing": 1},
        {"split": "val", "ok": False},
        {"group_id": "g999"},
    ):
        assert store.ids_matching(no_match).size == 0, no_match


def test_filters_keep_json_types_apart(tmp_path: Path) -> None:
    with MetadataStore.create(tmp_path / "m.sqlite") as s:
        values: list[Any] = [True, 1, "1", False, 0, "true", {"x": 1}, [1], None, 1.0]
        s.add(
            [
                Item(id=i, kind="image", uri="u", group_id="g", metadata={"v": v})
                for i, v in enumerate(values)
            ]
        )
        assert s.ids_matching({"v": True}).tolist() == [0]
        assert s.ids_matching({"v": 1}).tolist() == [1, 9]
        assert s.ids_matching({"v": "1"}).tolist() == [2]
        assert s.ids_matching({"v": False}).tolist() == [3]
        assert s.ids_matching({"v": 0}).tolist() == [4]
        assert s.ids_matching({"v": "true"}).tolist() == [5]
        # An object's JSON text is not a string value.
        assert s.ids_matching({"v": '{"x":1}'}).tolist() == []


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"a.b": 1}, "letters, digits"),
        ({"x') OR 1=1 --": 1}, "letters, digits"),
        ({"$": 1}, "letters, digits"),
        ({"": 1}, "letters, digits"),
        ({"tag\n": 1}, "letters, digits"),
        ({"k": None}, "must be a string, a number, a boolean or a condition"),
        ({"k": [1]}, "a list is not a value"),
        ({"k": {"a": 1}}, "Extra inputs are not permitted"),
        ({"k": {}}, "needs at least one of eq, ne, in"),
        ({"k": float("nan")}, "finite number"),
        ({"kind": 1}, "must be a string"),
        ({"kind": "audio"}, "not one of"),
        ({"kind": {"exists": True}}, "use eq, ne or in"),
    ],
)
def test_bad_filters_are_refused(
    store: MetadataStore, filters: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        store.ids_matching(filters)


def test_item_validation() -> None:
    with pytest.raises(ValidationError):
        Item(id=-1, kind="image", uri="u", group_id="g")
    with pytest.raises(ValidationError):
        Item(id=1, kind="audio", uri="u", group_id="g")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="together"):
        Item(id=1, kind="segment", uri="u", group_id="g", start_s=1.0)
    with pytest.raises(ValidationError, match="before"):
        Item(id=1, kind="segment", uri="u", group_id="g", start_s=2.0, end_s=1.0)


def test_non_json_metadata_is_refused(store: MetadataStore) -> None:
    bad = Item(id=50, kind="image", uri="u", group_id="g", metadata={"x": float("nan")})
    with pytest.raises(ValueError, match="item id 50: metadata is not JSON"):
        store.add([bad])
    assert store.count() == 40


def test_readonly_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    with MetadataStore.create(path) as s:
        s.add(_items(4))
    with MetadataStore.open(path) as ro:
        with pytest.raises(MetadataStoreError, match="read-only"):
            ro.add(_items(1, start=10))
        with pytest.raises(MetadataStoreError, match="read-only"):
            ro.remove([1])
        # SQLite itself refuses too: the connection was opened with mode=ro.
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            ro._conn.execute("UPDATE items SET removed = 1")
        assert ro.live_count() == 4
    with MetadataStore.open(path, readonly=False) as rw:
        assert rw.remove([1]) == 1
    with MetadataStore.open(path) as ro:
        assert ro.removed_ids().tolist() == [1]


def test_open_missing_or_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MetadataStore.open(tmp_path / "nope.sqlite")
    assert not (tmp_path / "nope.sqlite").exists()  # opening never creates the file

    text = tmp_path / "text.sqlite"
    text.write_text("not a database at all, just some text " * 100)
    with pytest.raises(MetadataStoreError, match="not a metadata store"):
        MetadataStore.open(text)

    other = tmp_path / "other.sqlite"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(MetadataStoreError, match="not a metadata store"):
        MetadataStore.open(other, readonly=False)

    future = tmp_path / "future.sqlite"
    MetadataStore.create(future).close()
    conn = sqlite3.connect(future)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(MetadataStoreError, match="schema version 99"):
        MetadataStore.open(future)

    with pytest.raises(FileExistsError):
        MetadataStore.create(future)


def test_path_with_uri_characters(tmp_path: Path) -> None:
    path = tmp_path / "odd dir?#%" / "m e?ta.sqlite"
    path.parent.mkdir()
    with MetadataStore.create(path) as s:
        s.add(_items(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["m e?ta.sqlite"]
    with MetadataStore.open(path) as s:
        assert s.count() == 2


def test_copy_to_is_independent(tmp_path: Path) -> None:
    src_path, dst_path = tmp_path / "v1.sqlite", tmp_path / "v2.sqlite"
    with MetadataStore.create(src_path) as s:
        s.add(_items(10))
        s.remove([2])
    with MetadataStore.open(src_path) as src, src.copy_to(dst_path) as dst:
        assert not dst.readonly
        assert list(dst.iter_items()) == list(src.iter_items())
        assert dst.removed_ids().tolist() == [2]
        dst.add(_items(3, start=dst.max_id() + 1))
        assert dst.remove([0, 1]) == 2
        assert (src.count(), src.live_count()) == (10, 9)
        assert (dst.count(), dst.live_count()) == (13, 10)
        with pytest.raises(FileExistsError):
            src.copy_to(dst_path)
    with MetadataStore.open(dst_path) as reopened:
        assert reopened.removed_ids().tolist() == [0, 1, 2]


def test_concurrent_reads_from_four_threads(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite"
    with MetadataStore.create(path) as s:
        s.add(_items(400))
        s.remove(list(range(0, 400, 7)))
    with MetadataStore.open(path) as store:
        expected = {it.id: it for it in store.iter_items()}
        barrier = threading.Barrier(4)

        def reader(seed: int) -> int:
            rng = np.random.default_rng(seed)
            barrier.wait()  # start together so the calls really overlap
            checked = 0
            for _ in range(30):
                ids = rng.integers(-5, 410, size=64)
                got = store.get(ids)
                assert got == [expected.get(int(i)) for i in ids]
                train = store.ids_matching({"split": "train", "kind": "caption"})
                assert train.tolist() == sorted(
                    i
                    for i, it in expected.items()
                    if it.metadata["split"] == "train" and it.kind == "caption"
                )
                assert store.live_count() == len(expected)
                checked += len(ids)
            assert [it.id for it in store.iter_items(batch=50)] == sorted(expected)
            return checked

        with ThreadPoolExecutor(4) as pool:
            assert sum(pool.map(reader, range(4))) == 4 * 30 * 64
