"""The fields of an item that filters name, and how SQL reaches them.

``kind``, ``group_id`` and ``uri`` are columns of a segment's ``items`` table; every other
field is a top-level key of the item's ``metadata`` JSON, read as ``json_extract(metadata,
'$.key')``. The key is written into the SQL text (so that SQLite can match the expression
index :func:`field_index_sql` makes), which is safe only because :data:`FIELD_NAME` lets no
quote, dot or bracket through: every filter key is checked against it first. The names
themselves are the API's (``wire.fields``, shared with the client).
"""

from __future__ import annotations

from wire.fields import ANY_OF, COLUMNS, FIELD_NAME, FILE_TEXT_FIELDS, KINDS, Kind

__all__ = [
    "ANY_OF",
    "COLUMNS",
    "FIELD_NAME",
    "FILE_TEXT_FIELDS",
    "KINDS",
    "Kind",
    "field_index_sql",
    "field_path",
]


def field_path(key: str) -> str:
    """The SQL literal of metadata key ``key``'s JSON path."""
    if not FIELD_NAME.fullmatch(key):
        raise ValueError(f"field {key!r}: metadata keys are 1 to 64 letters, digits or '_'")
    return f"'$.{key}'"


def field_index_sql(key: str) -> str:
    """The expression index that lets filters on metadata key ``key`` use an index (the
    expression is the one the filter compiler writes, which is how SQLite matches them)."""
    if key in COLUMNS or key == ANY_OF:
        raise ValueError(f"cannot index {key!r}: kind, group_id and uri are indexed already")
    return (
        f"CREATE INDEX IF NOT EXISTS items_field_{key} "
        f"ON items (json_extract(metadata, {field_path(key)}))"
    )
