"""Relevance cut-off and ordering of one query's hits (``min_score``, ``sort``).

``hits best first -> drop below min_score (before hydration, in QueryEngine) -> sort by a
metadata field -> page with offset and k``. Sorting orders every hit at or above the cut-off
that the search gathered (the server's max_offset + max_k best), so paging over a sorted
answer is consistent: page 2 starts where page 1 ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from indexer.collection import Hit

# A value's place among the others: numbers before text; anything else (a list, an object,
# null) counts as missing: such values have no order among the others.
_NUMBER, _TEXT = 0, 1


def _sort_value(value: Any) -> tuple[int, float | str] | None:
    if isinstance(value, bool):  # a bool is an int to Python; order it as 0/1
        return _NUMBER, float(value)
    if isinstance(value, int | float):
        return _NUMBER, float(value)
    if isinstance(value, str):
        return _TEXT, value  # ISO dates and times order as text
    return None


def sort_hits(hits: Sequence[Hit], sort: str) -> list[Hit]:
    """``hits`` ordered by the metadata field ``sort`` names (``-field``: descending); hits
    without a usable value come last; ties (and the hits without the field) by score, best
    first, then id."""
    descending = sort.startswith("-")
    field = sort.lstrip("-")
    by_score = sorted(hits, key=lambda hit: (-hit.score, hit.id))
    valued: list[tuple[tuple[int, float | str], Hit]] = []
    missing: list[Hit] = []
    for hit in by_score:
        value = _sort_value(hit.item.metadata.get(field))
        if value is None:
            missing.append(hit)
        else:
            valued.append((value, hit))
    # Stable (reverse=True keeps it so): equal values keep the score order of by_score.
    valued.sort(key=lambda pair: pair[0], reverse=descending)
    return [hit for _, hit in valued] + missing
