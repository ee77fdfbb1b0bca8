"""The id scheme: record number * stride + sub-index, and adds numbered after every id given."""

from __future__ import annotations

import pytest

from indexer.build_spec import CorpusKind
from indexer.item_ids import STRIDE, item_id, next_record_number


@pytest.mark.parametrize("kind", ["image", "caption", "video"])
def test_ids_of_one_record_stay_below_the_next_records(kind: CorpusKind) -> None:
    last_sub = STRIDE[kind] - 1
    assert item_id(kind, 7) <= item_id(kind, 7, last_sub) < item_id(kind, 8)
    with pytest.raises(ValueError, match="at most"):
        item_id(kind, 7, STRIDE[kind])
    # An add after record 7's last item starts at record 8, whichever item was the largest.
    assert next_record_number(kind, item_id(kind, 7, last_sub)) == 8
    assert next_record_number(kind, item_id(kind, 7)) == 8
    assert next_record_number(kind, -1) == 0  # nothing given yet
