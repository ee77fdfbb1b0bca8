"""The filter language of searches and removes, as the API carries it: conditions on an
item's fields, checked against limits (the SQL compiler is ``indexer.filters``).

``JSON -> Filter (pydantic: shape, types, limits)``, or ``--where`` text -> ``parse_where``.

=========================================  =================================================
``{"split": "test"}``                      equality (a string, number or boolean)
``{"year": {"gte": 2020, "lt": 2024}}``    ranges (``gt``, ``gte``, ``lt``, ``lte``) on
                                           numbers, or on ISO 8601 dates and times
``{"tag": {"in": ["cat", "dog"]}}``        one of a list
``{"split": {"ne": "train"}}``             not equal (items without the field match)
``{"caption": {"exists": true}}``          the field is present and not null
``{"any_of": [{...}, {...}]}``             OR of filters, each an AND of its conditions
=========================================  =================================================

Fields are ``kind``, ``group_id`` and ``uri`` (columns: text, with ``eq``, ``ne`` and ``in``)
or a top-level key of the item's metadata (letters, digits and ``_``; ``any_of`` is the OR).
The conditions of one object AND together, as do the operators of one condition. Types are
exact: ``1`` matches neither ``"1"`` nor ``true``; a number range matches numbers only, a date
range text only (``indexer.filters`` says how they compare).

Limits (each refusal names it): :data:`MAX_CONDITIONS` conditions in all, :data:`MAX_LIST`
values in one ``in``, :data:`MAX_VALUES` values in all, ``any_of`` nested :data:`MAX_DEPTH`
deep, strings of :data:`MAX_TEXT` characters. They keep SQLite's expression tree shallow and
its bound variables well under its limit of 32,766.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import date, datetime
from typing import Annotated, Any, Final, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    RootModel,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    model_validator,
)

from wire.errors import FilterError, first_problem
from wire.fields import ANY_OF, COLUMNS, FIELD_NAME, FILE_TEXT_FIELDS, KINDS

MAX_CONDITIONS: Final = 64
MAX_LIST: Final = 1000
MAX_VALUES: Final = 10_000
MAX_DEPTH: Final = 3
MAX_TEXT: Final = 1000
RANGES: Final = ("gt", "gte", "lt", "lte")

Int64 = Annotated[StrictInt, Field(ge=-(2**63), lt=2**63)]
Finite = Annotated[StrictFloat, Field(allow_inf_nan=False)]
Text = Annotated[StrictStr, Field(max_length=MAX_TEXT)]


def _iso_date(value: str) -> str:
    try:
        (datetime if "T" in value or " " in value else date).fromisoformat(value)
    except ValueError:
        raise FilterError(
            f"range bound {value!r} is neither a number nor an ISO 8601 date or date-time"
        ) from None
    return value


IsoDate = Annotated[Text, AfterValidator(_iso_date)]


def _json_type(value: Any) -> str | None:
    """The branch of a union a value belongs to, by its JSON type: each value is validated
    against one branch only, so a refusal names one problem, not one per branch."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "text"
    if isinstance(value, Mapping | Condition):
        return "condition"
    if isinstance(value, list):
        return "list"
    return None


def _by_json_type(what: str) -> Discriminator:
    return Discriminator(
        _json_type,
        custom_error_type="filter_value",
        custom_error_message=f"must be {what}",
    )


Value = Annotated[
    Annotated[StrictBool, Tag("bool")]
    | Annotated[Int64, Tag("int")]
    | Annotated[Finite, Tag("float")]
    | Annotated[Text, Tag("text")],
    _by_json_type("a string, a number or a boolean"),
]
Bound = Annotated[
    Annotated[Int64, Tag("int")]
    | Annotated[Finite, Tag("float")]
    | Annotated[IsoDate, Tag("text")],
    _by_json_type("a number or an ISO 8601 date"),
]


class Condition(BaseModel):
    """Operators on one field, all of which must hold."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    eq: Value | None = None
    ne: Value | None = None
    in_: list[Value] | None = Field(
        None, alias="in", min_length=1, max_length=MAX_LIST, description="one of these values"
    )
    gt: Bound | None = None
    gte: Bound | None = None
    lt: Bound | None = None
    lte: Bound | None = None
    exists: StrictBool | None = Field(None, description="present and not null (or not)")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        given = self.operators()
        if not given:
            raise FilterError(
                "a condition needs at least one of eq, ne, in, gt, gte, lt, lte, exists"
            )
        bounds = [given[op] for op in RANGES if op in given]
        if len({isinstance(b, str) for b in bounds}) > 1:
            raise FilterError("the bounds of one range must all be numbers or all be dates")
        return self

    def operators(self) -> dict[str, Any]:
        """The operators given, by their JSON names."""
        return self.model_dump(by_alias=True, exclude_none=True)


Term = Annotated[
    Annotated[StrictBool, Tag("bool")]
    | Annotated[Int64, Tag("int")]
    | Annotated[Finite, Tag("float")]
    | Annotated[Text, Tag("text")]
    | Annotated[Condition, Tag("condition")]
    | Annotated[list["Filter"], Tag("list")],
    _by_json_type("a string, a number, a boolean or a condition object (eq, in, gte, ...)"),
]


def _measure(raw: Any, depth: int = 1) -> tuple[int, int]:
    """(conditions, values) of a raw filter, counted before any other validation so that an
    oversized one is refused for its size, not for the first odd value in it."""
    if not isinstance(raw, Mapping):
        return 0, 0  # the type check says what is wrong
    if depth > MAX_DEPTH:
        raise FilterError(f"any_of may be nested at most {MAX_DEPTH} deep")
    conditions = values = 0
    for key, term in raw.items():
        if key == ANY_OF and isinstance(term, list):
            for branch in term:
                more, held = _measure(branch, depth + 1)
                conditions, values = conditions + more, values + held
            continue
        conditions += 1
        if isinstance(term, Mapping):
            listed = term.get("in")
            values += len(term) + (len(listed) if isinstance(listed, list) else 0)
        else:
            values += 1
    return conditions, values


class Filter(RootModel[dict[str, Term]]):
    """Field -> value (equality) or condition; ``any_of`` -> a list of filters (OR)."""

    root: dict[str, Term]

    @model_validator(mode="before")
    @classmethod
    def _within_limits(cls, raw: Any) -> Any:
        if isinstance(raw, Filter):
            return raw.root
        if not isinstance(raw, Mapping):
            raise FilterError("a filter is a JSON object of field: value or field: condition")
        conditions, values = _measure(raw)
        if conditions > MAX_CONDITIONS:
            raise FilterError(
                f"a filter may have at most {MAX_CONDITIONS} conditions; this one has {conditions}"
            )
        if values > MAX_VALUES:
            raise FilterError(
                f"a filter may hold at most {MAX_VALUES} values; this one holds {values}"
            )
        for key, term in raw.items():
            if key == ANY_OF and (not isinstance(term, list) or not term):
                raise FilterError("any_of takes a non-empty list of filters")
            if key != ANY_OF and isinstance(term, list):
                raise FilterError(
                    f"field {key!r}: a list is not a value; for one of several write "
                    f'{{"{key}": {{"in": [...]}}}}'
                )
        return raw

    @model_validator(mode="after")
    def _fields(self) -> Self:
        for key, term in self.root.items():
            if key == ANY_OF or isinstance(term, list):
                continue  # the shapes were checked before
            if key in COLUMNS:
                _check_column(key, term)
            elif not FIELD_NAME.fullmatch(key):
                raise FilterError(
                    f"field {key!r}: metadata keys are 1 to 64 letters, digits or '_'"
                )
        return self

    def canonical(self) -> dict[str, Any]:
        """The filter as plain JSON (operators by their JSON names), for cache keys."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


Filter.model_rebuild()


def _check_column(key: str, term: Value | Condition) -> None:
    operators: dict[str, Any] = term.operators() if isinstance(term, Condition) else {"eq": term}
    unsupported = sorted(set(operators) - {"eq", "ne", "in"})
    if unsupported:
        raise FilterError(
            f"field {key!r} is text and always present: use eq, ne or in, not "
            + ", ".join(unsupported)
        )
    values = [operators.get("eq"), operators.get("ne"), *(operators.get("in") or [])]
    for value in (v for v in values if v is not None):
        if not isinstance(value, str):
            raise FilterError(f"field {key!r}: {value!r} must be a string")
        if key == "kind" and value not in KINDS:
            raise FilterError(f"field 'kind': {value!r} is not one of {', '.join(KINDS)}")


def as_filter(filters: Filter | Mapping[str, Any] | None) -> Filter | None:
    """A validated filter (None or ``{}``: no filter); :class:`FilterError` says what is
    wrong with one that does not validate."""
    if filters is None:
        return None
    if isinstance(filters, Filter):
        parsed = filters
    else:
        try:
            parsed = Filter.model_validate(filters)
        except ValidationError as error:
            raise FilterError(first_problem(error)) from None
    return parsed if parsed.root else None


# -- the text form (the command line's --where, the page's filter box) ------------------------

_WHERE: Final = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$")
_TEXT_OPERATORS: Final = {"=": "eq", "!=": "ne", ">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}
# What reads as a number, written out (not Python's int() and float(), which also take
# "1_000", "nan" and other scripts' digits) so that the page's copy (service/static/where.js)
# reads every value the same way; tests/test_page_browser.py compares the two.
_INTEGER: Final = re.compile(r"[+-]?[0-9]+")
_DECIMAL: Final = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
# A comma starts a new condition only where a FIELD and an operator follow, so that a value
# may hold commas ("caption=red, round" is one condition).
_NEXT_CONDITION: Final = re.compile(r",(?=\s*[A-Za-z0-9_]+\s*(?:>=|<=|!=|=|>|<))")
# Integers beyond what a JSON reader in a browser holds exactly stay text on both sides.
_SAFE_INTEGER: Final = 2**53 - 1


def split_where(text: str) -> list[str]:
    """The conditions of one line (``split=test, year>=2020``); empty parts are dropped."""
    return [part.strip() for part in _NEXT_CONDITION.split(text) if part.strip()]


def parse_where(conditions: list[str] | tuple[str, ...]) -> Filter | None:
    """``FIELD=VALUE``, ``FIELD!=VALUE``, ``FIELD>=VALUE`` (and ``>``, ``<``, ``<=``) and
    ``FIELD=a|b|c`` (one of), ANDed. Metadata values that read as numbers (``_INTEGER``,
    ``_DECIMAL``) or as ``true``/``false`` are those; anything else (and every value of kind,
    group_id, uri and the file fields of ``FILE_TEXT_FIELDS``, e.g. folder) is text."""
    merged: dict[str, dict[str, Any]] = {}
    for condition in conditions:
        match = _WHERE.match(condition)
        if match is None:
            raise FilterError(
                f"{condition!r} is not FIELD=VALUE (or !=, >, >=, <, <=; a|b for one of)"
            )
        key, symbol, text = match.groups()
        operator = _TEXT_OPERATORS[symbol]
        given = merged.setdefault(key, {})
        if operator == "eq" and "|" in text:
            given["in"] = [_typed(key, part) for part in text.split("|")]
        else:
            given[operator] = _typed(key, text)
    return as_filter(merged)


def _typed(key: str, text: str) -> Any:
    if key in COLUMNS or key in FILE_TEXT_FIELDS:
        return text
    if text in ("true", "false"):
        return text == "true"
    if _INTEGER.fullmatch(text):
        number = int(text)
        return number if abs(number) <= _SAFE_INTEGER else text
    if _DECIMAL.fullmatch(text):
        value = float(text)
        return value if abs(value) != float("inf") else text
    return text
