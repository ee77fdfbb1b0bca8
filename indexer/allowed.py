"""The ids a filtered search may return, with their FAISS selector, and a cache of them per
opened version and filter.

``filter -> SQL per segment (indexer.filters) -> matching ids minus the deleted ->
AllowedIds (ids ascending + a bitmap selector, built once) -> FilterCache[canonical filter]``

A version never changes, so what a filter selects in it never does either: the first query
with a filter pays the SQL (a scan of the segment's metadata, or an index range with
``--index-field``), the following ones reuse the ids and the selector. A bitmap selector
(one bit per id up to the largest allowed) answers FAISS's membership test with one load,
where ``IDSelectorBatch`` hashes; ids beyond :data:`BITMAP_MAX_IDS` fall back to the batch.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

import faiss
import numpy as np

BITMAP_MAX_IDS: Final = 2**27  # a 16 MiB bitmap
FILTER_CACHE_SIZE: Final = 64  # filters remembered per opened version


class AllowedIds:
    """Distinct ids, ascending, and the selector over exactly them (built on first use; the
    arrays it points into are held here, since FAISS keeps bare pointers)."""

    def __init__(self, ids: np.ndarray, *, checked: bool = False) -> None:
        self.ids = (
            np.asarray(ids, dtype=np.int64)
            if checked
            else np.unique(np.asarray(ids, dtype=np.int64).ravel())
        )
        self._selector: Any = None
        self._held: np.ndarray | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.ids)

    def selector(self) -> faiss.IDSelector:
        with self._lock:
            if self._selector is None:
                top = int(self.ids[-1]) + 1 if len(self.ids) else 0
                if int(self.ids[0] if len(self.ids) else 0) >= 0 and top <= BITMAP_MAX_IDS:
                    mask = np.zeros(top, dtype=bool)
                    mask[self.ids] = True
                    self._held = np.packbits(mask, bitorder="little")
                    self._selector = faiss.IDSelectorBitmap(
                        len(self._held), faiss.swig_ptr(self._held)
                    )
                else:
                    self._held = self.ids
                    self._selector = faiss.IDSelectorBatch(self.ids)
            return self._selector


class FilterCache:
    """Least recently used: canonical filter JSON -> what ``compute`` made of it."""

    def __init__(self, size: int = FILTER_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
        value = compute()  # outside the lock: two threads may both compute; both are right
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return value
