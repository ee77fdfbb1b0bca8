"""Item ids: ``record number * stride + sub-index``, the one definition of the id scheme.

An image is its record number; a caption adds its position among the image's captions (stride
1,024); a video is ``number * 1,000,000`` and its segments add 1, 2, ... Ids thus never depend
on which other items decoded, which lets shards be built, resumed and appended independently;
an add numbers its records after the largest id a collection ever gave
(:func:`next_record_number`), so new ids never collide with old ones, removed ones included.
"""

from __future__ import annotations

from typing import Final

from indexer.build_spec import CorpusKind

STRIDE: Final[dict[CorpusKind, int]] = {"image": 1, "caption": 1024, "video": 1_000_000}


def item_id(kind: CorpusKind, number: int, sub: int = 0) -> int:
    """The id of a record's ``sub``-th item (a caption's position, a video's segment)."""
    if not 0 <= sub < STRIDE[kind]:
        raise ValueError(f"a {kind} record holds at most {STRIDE[kind]} items, not {sub + 1}")
    return number * STRIDE[kind] + sub


def next_record_number(kind: CorpusKind, max_id: int) -> int:
    """The first record number all of whose ids are above ``max_id`` (-1: none given yet)."""
    return max_id // STRIDE[kind] + 1
