"""The filter language of searches and removes, compiled to SQL. The language itself (its
operators, fields, types and limits) and its ``--where`` text form are ``wire.filters``, which
the client shares; this module turns a validated :class:`~wire.filters.Filter` into one flat,
parameterised SQL condition over a segment's metadata.

``JSON -> Filter (wire.filters: shape, types, limits) -> to_sql -> (WHERE term, bound values)``

A date range compares text, which orders ISO 8601 values correctly when they share a format
and time zone (``2024-05-01`` or ``2024-05-01T10:00:00Z``, not a mix). The limits keep SQLite's
expression tree shallow (its depth is the number of terms; an ``in`` list is one flat term) and
its bound variables well under its limit of 32,766.

Nothing a client sends becomes SQL text but field names checked against a closed alphabet
(a metadata key is inlined as the JSON path ``'$.key'``, which lets SQLite use an expression
index over it, see ``indexer.fields``); every value is a bound parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from indexer.errors import FilterError
from indexer.fields import COLUMNS, field_path
from wire import errors as wire_errors
from wire import filters as wire_filters
from wire.fields import ANY_OF
from wire.filters import (
    MAX_CONDITIONS,
    MAX_DEPTH,
    MAX_LIST,
    MAX_TEXT,
    MAX_VALUES,
    RANGES,
    Condition,
    Filter,
    split_where,
)

__all__ = [
    "MAX_CONDITIONS",
    "MAX_DEPTH",
    "MAX_LIST",
    "MAX_TEXT",
    "MAX_VALUES",
    "Condition",
    "Filter",
    "as_filter",
    "parse_where",
    "split_where",
    "to_sql",
]

_SQL_OPERATORS: Final = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def as_filter(filters: Filter | Mapping[str, Any] | None) -> Filter | None:
    """A validated filter (None or ``{}``: no filter); :class:`FilterError` says what is
    wrong with one that does not validate."""
    try:
        return wire_filters.as_filter(filters)
    except wire_errors.FilterError as error:
        raise FilterError(str(error)) from None


def parse_where(conditions: list[str] | tuple[str, ...]) -> Filter | None:
    """``--where`` text as a filter (``wire.filters.parse_where``), or :class:`FilterError`."""
    try:
        return wire_filters.parse_where(conditions)
    except wire_errors.FilterError as error:
        raise FilterError(str(error)) from None


# -- compiling -------------------------------------------------------------------------------


def to_sql(filters: Filter) -> tuple[str, list[Any]]:
    """One SQL condition over ``items`` (its columns and ``metadata``), with its parameters."""
    params: list[Any] = []
    return _all_of(filters, params), params


def _all_of(filters: Filter, params: list[Any]) -> str:
    terms = []
    for key, term in filters.root.items():
        if key == ANY_OF:
            assert isinstance(term, list)
            terms.append("(" + " OR ".join(_all_of(branch, params) for branch in term) + ")")
        else:
            assert not isinstance(term, list)
            operators = term.operators() if isinstance(term, Condition) else {"eq": term}
            terms.extend(_field_terms(key, operators, params))
    return "(" + " AND ".join(terms) + ")" if terms else "1"


def _field_terms(key: str, operators: dict[str, Any], params: list[Any]) -> list[str]:
    if key in COLUMNS:
        return _column_terms(key, operators, params)
    path = field_path(key)
    terms = []
    if "eq" in operators:
        terms.append(_equals(path, operators["eq"], params))
    if "ne" in operators:
        terms.append(f"NOT IFNULL({_equals(path, operators['ne'], params)}, 0)")
    if "in" in operators:
        terms.append(_one_of(path, operators["in"], params))
    bounds = [(op, operators[op]) for op in RANGES if op in operators]
    if bounds:
        text = isinstance(bounds[0][1], str)
        kinds = "= 'text'" if text else "IN ('integer', 'real')"
        compared = [f"json_extract(metadata, {path}) {_SQL_OPERATORS[op]} ?" for op, _ in bounds]
        params.extend(bound for _, bound in bounds)
        terms.append(f"(json_type(metadata, {path}) {kinds} AND {' AND '.join(compared)})")
    if "exists" in operators:
        test = "!=" if operators["exists"] else "="
        terms.append(f"IFNULL(json_type(metadata, {path}), 'null') {test} 'null'")
    return terms


def _column_terms(key: str, operators: dict[str, Any], params: list[Any]) -> list[str]:
    terms = []
    if "eq" in operators:
        terms.append(f"{key} = ?")
        params.append(operators["eq"])
    if "ne" in operators:
        terms.append(f"{key} != ?")
        params.append(operators["ne"])
    if "in" in operators:
        terms.append(f"{key} IN ({', '.join('?' * len(operators['in']))})")
        params.extend(operators["in"])
    return terms


def _equals(path: str, value: Any, params: list[Any]) -> str:
    # json_extract gives 1/0 for true/false, so the JSON type is compared too: true must not
    # match 1, and "1" must not match 1.
    if isinstance(value, bool):
        return f"(json_type(metadata, {path}) = '{'true' if value else 'false'}')"
    params.append(value)
    if isinstance(value, str):
        return f"(json_type(metadata, {path}) = 'text' AND json_extract(metadata, {path}) = ?)"
    return (
        f"(json_type(metadata, {path}) IN ('integer', 'real') "
        f"AND json_extract(metadata, {path}) = ?)"
    )


def _one_of(path: str, values: list[Any], params: list[Any]) -> str:
    flags = sorted({"true" if v else "false" for v in values if isinstance(v, bool)})
    texts = [v for v in values if isinstance(v, str)]
    numbers = [v for v in values if not isinstance(v, bool | str)]
    terms = []
    if flags:
        terms.append(f"json_type(metadata, {path}) IN ({', '.join(repr(f) for f in flags)})")
    for kinds, group in (("= 'text'", texts), ("IN ('integer', 'real')", numbers)):
        if group:
            marks = ", ".join("?" * len(group))
            terms.append(
                f"(json_type(metadata, {path}) {kinds} "
                f"AND json_extract(metadata, {path}) IN ({marks}))"
            )
            params.extend(group)
    return "(" + " OR ".join(terms) + ")"
