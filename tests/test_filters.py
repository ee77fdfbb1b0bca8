"""The filter language (``indexer/filters.py``) against a reference written in Python: random
filters over random items select exactly the items the reference selects, every limit is
refused naming itself, no key reaches SQL unchecked, and an indexed field's filter uses its
index."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from benchmarks.index_filter import filter_bench
from indexer.fields import COLUMNS
from indexer.filters import (
    MAX_CONDITIONS,
    MAX_DEPTH,
    MAX_LIST,
    MAX_VALUES,
    Filter,
    parse_where,
    split_where,
    to_sql,
)
from indexer.metadata import Item, MetadataStore

KEYS = ("a", "b", "year", "day")
DATES = ("2020-01-01", "2020-06-30", "2021-02-03", "2021-02-03T10:00:00")
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([0.5, 1.0, 2.5, -1.5]),
    st.sampled_from(["x", "y", "1", "true", "", "é"]),
)
STORED = st.one_of(SCALARS, st.sampled_from(DATES), st.none(), st.just([1, 2]), st.just({"z": 1}))
ITEMS = st.lists(
    st.fixed_dictionaries(
        {
            "kind": st.sampled_from(["image", "caption"]),
            "group_id": st.sampled_from(["g1", "g2"]),
            "metadata": st.dictionaries(st.sampled_from(KEYS), STORED, max_size=4),
        }
    ),
    min_size=1,
    max_size=30,
)


def _condition() -> st.SearchStrategy[dict[str, Any]]:
    numbers = st.one_of(st.integers(-3, 3), st.sampled_from([0.5, 2.5]))
    bounds = st.one_of(
        st.dictionaries(st.sampled_from(["gt", "gte", "lt", "lte"]), numbers, min_size=1),
        st.dictionaries(
            st.sampled_from(["gt", "gte", "lt", "lte"]), st.sampled_from(DATES), min_size=1
        ),
    )
    simple = st.one_of(
        st.builds(lambda v: {"eq": v}, SCALARS),
        st.builds(lambda v: {"ne": v}, SCALARS),
        st.builds(lambda v: {"in": v}, st.lists(SCALARS, min_size=1, max_size=4)),
        st.builds(lambda v: {"exists": v}, st.booleans()),
    )
    return st.one_of(simple, bounds, st.builds(lambda a, b: a | b, simple, bounds))


def _one_condition() -> st.SearchStrategy[dict[str, Any]]:
    """One condition on one field: what each operator means, where composed filters (which
    mostly match nothing) rarely look."""
    field = st.builds(
        lambda key, term: {key: term}, st.sampled_from(KEYS), st.one_of(SCALARS, _condition())
    )
    column = st.builds(
        lambda v: {"kind": v}, st.sampled_from(["image", {"ne": "image"}, {"in": ["caption"]}])
    )
    return st.one_of(field, column)


def _filters(depth: int = 1) -> st.SearchStrategy[dict[str, Any]]:
    column = st.fixed_dictionaries(
        {}, optional={"kind": st.sampled_from(["image", "caption", {"ne": "image"}])}
    )
    fields = st.dictionaries(
        st.sampled_from(KEYS), st.one_of(SCALARS, _condition()), min_size=0, max_size=2
    )
    plain = st.builds(lambda c, f: c | f, column, fields)
    if depth >= MAX_DEPTH:
        return plain
    branches = st.lists(_filters(depth + 1), min_size=1, max_size=2)
    return st.one_of(plain, st.builds(lambda p, b: p | {"any_of": b}, plain, branches))


def _equal(stored: Any, value: Any) -> bool:
    if isinstance(value, bool) or isinstance(stored, bool):
        return stored is value
    if isinstance(value, str):
        return isinstance(stored, str) and stored == value
    return isinstance(stored, int | float) and stored == value


def _holds(item: dict[str, Any], key: str, operators: dict[str, Any]) -> bool:
    """The reference semantics of one condition (the module docstring's)."""
    if key in COLUMNS:
        stored: Any = item[key]
        present = True
    else:
        present = key in item["metadata"]
        stored = item["metadata"].get(key)
    checks = []
    if "eq" in operators:
        checks.append(present and _equal(stored, operators["eq"]))
    if "ne" in operators:
        checks.append(not (present and _equal(stored, operators["ne"])))
    if "in" in operators:
        checks.append(present and any(_equal(stored, v) for v in operators["in"]))
    bounds = {op: operators[op] for op in ("gt", "gte", "lt", "lte") if op in operators}
    if bounds:
        text = isinstance(next(iter(bounds.values())), str)
        typed = isinstance(stored, str) if text else (
            isinstance(stored, int | float) and not isinstance(stored, bool)
        )  # fmt: skip
        compare = {
            "gt": lambda s, b: s > b,
            "gte": lambda s, b: s >= b,
            "lt": lambda s, b: s < b,
            "lte": lambda s, b: s <= b,
        }
        checks.append(typed and all(compare[op](stored, b) for op, b in bounds.items()))
    if "exists" in operators:
        checks.append((present and stored is not None) == operators["exists"])
    return all(checks)


def _matches(item: dict[str, Any], raw: dict[str, Any]) -> bool:
    for key, term in raw.items():
        if key == "any_of":
            if not any(_matches(item, branch) for branch in term):
                return False
        elif not _holds(item, key, term if isinstance(term, dict) else {"eq": term}):
            return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=ITEMS, raw=st.one_of(_one_condition(), _filters()))
def test_random_filters_select_what_the_reference_selects(
    tmp_path_factory: pytest.TempPathFactory, items: list[dict[str, Any]], raw: dict[str, Any]
) -> None:
    path = tmp_path_factory.mktemp("filters") / "m.sqlite"
    with MetadataStore.create(path, index_fields=("year",)) as store:
        store.add(
            [
                Item(
                    id=i,
                    kind=it["kind"],
                    uri=f"u{i}",
                    group_id=it["group_id"],
                    metadata=it["metadata"],
                )
                for i, it in enumerate(items)
            ]
        )
        expected = [i for i, it in enumerate(items) if _matches(it, raw)]
        assert store.ids_matching(raw).tolist() == expected, raw


# One item per kind of stored value, so that each operator meets each of them.
STORED_VALUES: list[Any] = [
    "missing", None, True, False, 0, 1, 1.0, 2.5, "1", "x", "2020-06-30", "2021-02-03T10:00:00",
    [1], {"z": 1},
]  # fmt: skip


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"v": 1}, [5, 6]),  # 1 and 1.0; not true, not "1"
        ({"v": True}, [2]),
        ({"v": "1"}, [8]),
        ({"v": {"ne": 1}}, [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13]),  # missing and null too
        ({"v": {"ne": True}}, [0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]),
        ({"v": {"in": [0, "x", False]}}, [3, 4, 9]),
        ({"v": {"gt": 0}}, [5, 6, 7]),  # numbers only: not true
        ({"v": {"gte": 0, "lt": 2}}, [4, 5, 6]),
        # Text only, compared as text (documented): "x" sorts after every date, "1" before.
        ({"v": {"gte": "2020-01-01"}}, [9, 10, 11]),
        ({"v": {"lt": "2021-01-01"}}, [8, 10]),
        ({"v": {"exists": True}}, [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]),
        ({"v": {"exists": False}}, [0, 1]),
        ({"any_of": [{"v": True}, {"v": {"gt": 2}}]}, [2, 7]),
        ({"any_of": [{"v": {"exists": False}}, {"kind": "caption"}]}, [0, 1, 13]),
        ({"kind": {"ne": "image"}, "v": {"exists": True}}, [13]),
    ],
)
def test_each_operator_on_each_kind_of_stored_value(
    tmp_path: Path, raw: dict[str, Any], expected: list[int]
) -> None:
    with MetadataStore.create(tmp_path / "m.sqlite") as store:
        store.add(
            [
                Item(
                    id=i,
                    kind="caption" if i == 13 else "image",
                    uri=f"u{i}",
                    group_id="g",
                    metadata={} if value == "missing" else {"v": value},
                )
                for i, value in enumerate(STORED_VALUES)
            ]
        )
        assert store.ids_matching(raw).tolist() == expected


def test_the_limits_are_refused_naming_them() -> None:
    wide = {f"k{i}": 1 for i in range(1000)}
    cases: list[tuple[dict[str, Any], str]] = [
        (wide, f"at most {MAX_CONDITIONS} conditions; this one has 1000"),
        ({"k": {"in": list(range(MAX_LIST + 1))}}, f"at most {MAX_LIST} items"),
        (
            {"any_of": [{f"k{j}": {"in": list(range(900))}} for j in range(12)]},
            f"at most {MAX_VALUES} values",
        ),
        ({"k": "x" * 1001}, "at most 1000 characters"),
    ]  # fmt: skip
    nested: dict[str, Any] = {"k": 1}
    for _ in range(MAX_DEPTH):
        nested = {"any_of": [nested]}
    cases.append((nested, f"nested at most {MAX_DEPTH} deep"))
    for raw, message in cases:
        with pytest.raises(ValidationError, match=message):
            Filter.model_validate(raw)
    # At the limits themselves, they compile to SQL that SQLite runs.
    widest = Filter.model_validate(
        {f"k{i}": {"in": list(range(150))} for i in range(MAX_CONDITIONS)}
    )
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE items (id, kind, uri, group_id, metadata)")
    sql, params = to_sql(widest)
    assert conn.execute(f"SELECT id FROM items WHERE {sql}", params).fetchall() == []


@pytest.mark.parametrize(
    "key", ["a.b", "x') OR 1=1 --", "$", "", "tag\n", "a'", 'a"', "a[0]", "x" * 65, "é"]
)
def test_keys_outside_the_alphabet_never_reach_sql(key: str) -> None:
    with pytest.raises(ValidationError, match="letters, digits or '_'"):
        Filter.model_validate({key: 1})


def test_values_are_bound_never_spliced(tmp_path: Path) -> None:
    hostile = "x') OR 1=1 --"
    with MetadataStore.create(tmp_path / "m.sqlite") as store:
        store.add(
            [
                Item(id=0, kind="image", uri="u0", group_id="g", metadata={"t": hostile}),
                Item(id=1, kind="image", uri="u1", group_id="g", metadata={"t": "y"}),
            ]
        )
        assert store.ids_matching({"t": hostile}).tolist() == [0]
        assert store.ids_matching({"t": {"in": [hostile, "z"]}}).tolist() == [0]
        assert store.ids_matching({"uri": hostile}).tolist() == []
    sql, params = to_sql(Filter.model_validate({"t": hostile, "uri": {"in": [hostile]}}))
    assert hostile not in sql
    assert params.count(hostile) == 2


def test_an_indexed_field_is_filtered_through_its_index(tmp_path: Path) -> None:
    with MetadataStore.create(tmp_path / "m.sqlite", index_fields=("year",)) as store:
        store.add(
            [
                Item(id=i, kind="image", uri=f"u{i}", group_id="g", metadata={"year": 2000 + i})
                for i in range(50)
            ]
        )
        assert store.ids_matching({"year": {"gte": 2040}}).tolist() == list(range(40, 50))
    conn = sqlite3.connect(tmp_path / "m.sqlite")
    for raw in ({"year": {"gte": 2040}}, {"year": 2041}, {"year": {"in": [2001, 2002]}}):
        sql, params = to_sql(Filter.model_validate(raw))
        plan = conn.execute(
            f"EXPLAIN QUERY PLAN SELECT id FROM items WHERE removed = 0 AND {sql}", params
        ).fetchall()
        assert any("items_field_year" in str(row) for row in plan), (raw, plan)
    sql, params = to_sql(Filter.model_validate({"other": 1}))
    plan = conn.execute(f"EXPLAIN QUERY PLAN SELECT id FROM items WHERE {sql}", params).fetchall()
    assert not any("items_field" in str(row) for row in plan)


def test_the_text_form_reads_as_the_json_form() -> None:
    parsed = parse_where(["split=test", "year>=2020", "year<2024", "tag=a|b", "n!=3", "kind=image"])
    assert parsed is not None
    assert parsed.canonical() == {
        "split": {"eq": "test"},
        "year": {"gte": 2020, "lt": 2024},
        "tag": {"in": ["a", "b"]},
        "n": {"ne": 3},
        "kind": {"eq": "image"},
    }
    assert parse_where([]) is None
    assert parse_where(["flag=true", "w=1.5", "uri=7"]).canonical() == {  # type: ignore[union-attr]
        "flag": {"eq": True},
        "w": {"eq": 1.5},
        "uri": {"eq": "7"},
    }
    # The fields read from a user's files are text: folder 2024 is the folder named "2024".
    assert parse_where(["folder=2024", "path=1|2", "camera_model=5", "year=2024"]).canonical() == {  # type: ignore[union-attr]
        "folder": {"eq": "2024"},
        "path": {"in": ["1", "2"]},
        "camera_model": {"eq": "5"},
        "year": {"eq": 2024},
    }
    # Numbers are what a browser's JSON reads exactly; Python-only spellings stay text.
    assert parse_where(["a=1_000", "b=nan", "c=inf", "d=9007199254740993", "e=.5"]).canonical() == {  # type: ignore[union-attr]
        "a": {"eq": "1_000"},
        "b": {"eq": "nan"},
        "c": {"eq": "inf"},
        "d": {"eq": "9007199254740993"},
        "e": {"eq": 0.5},
    }
    assert split_where(" split=test , caption=red, round , year>=2020 ") == [
        "split=test",
        "caption=red, round",
        "year>=2020",
    ]
    for bad, message in (
        ("split", "is not FIELD=VALUE"),
        ("=x", "is not FIELD=VALUE"),
        ("a.b=1", "is not FIELD=VALUE"),
        ("day>=yesterday", "ISO 8601"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_where([bad])


def test_the_filter_bench_reports_every_selectivity(tmp_path: Path) -> None:
    out = tmp_path / "filter.json"
    args = ["--count", "20000", "--dim", "16", "--queries", "20", "--work", str(tmp_path / "w")]
    result = CliRunner().invoke(filter_bench, [*args, "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert set(data["filters"]) == {"50%", "1%", "0.01%"}
    for row in data["filters"].values():
        # The matches are what the synthetic field says they are, and every row is full.
        assert row["matching"] == round(row["expected_share"] * 20000)
        assert row["short_rows"] == 0
        assert row["foreign_hits"] == 0
        assert row["recall_at_10"] == 1.0  # Flat at 20,000: exact
        assert row["p50_ms"] > 0
    assert data["goals"]["short_rows"] == 0
    assert "| 0.01% " in result.output
