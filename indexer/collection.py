"""Reading a collection's live version: search with metadata, filters and tombstones.

A :class:`Collection` is one version, opened whole (index, vectors' ids, metadata); the service
keeps one per collection and swaps it when told a new version is live. Opening checks that the
version was built by the model bundle the caller embeds queries with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.assemble import INDEX_FILE, METADATA, IndexInfo, read_info
from indexer.errors import CollectionError
from indexer.faiss_index import load_index, search, supports_remove
from indexer.metadata import MetadataStore
from indexer.segments import Hit
from indexer.versions import current_dir, version_dir

logger = logging.getLogger("cots.index")


class Collection:
    def __init__(self, folder: Path, info: IndexInfo, index: faiss.Index, store: MetadataStore):
        self.folder = folder
        self.info = info
        self.index = index
        self.store = store
        self.version = int(folder.name)
        # Removed items whose vectors are still in the index (types that cannot delete, such as
        # HNSW): a search must ask for that many more. Flat and IVF dropped theirs.
        self._tombstoned_in_index = 0 if supports_remove(index) else len(store.removed_ids())

    @classmethod
    def open(
        cls,
        root: Path,
        name: str,
        *,
        bundle_id: str | None = None,
        version: int | None = None,
    ) -> Collection:
        """The live version of ``name`` (or ``version``). With ``bundle_id``, a version built by
        another model bundle is refused: its vectors live in another space."""
        folder = current_dir(root, name) if version is None else version_dir(root, name, version)
        if not (folder / "index.json").is_file():
            raise CollectionError(f"{folder} is not a complete index version (no index.json)")
        info = read_info(folder)
        if bundle_id is not None and info.model_bundle_id != bundle_id:
            raise CollectionError(
                f"collection {name!r} version {folder.name} was built with model bundle "
                f"{info.model_bundle_id[:12]}, but queries are embedded with {bundle_id[:12]}; "
                "rebuild the collection with this bundle (cots index build) or serve the other one"
            )
        index = load_index(folder / INDEX_FILE)
        store = MetadataStore.open(folder / METADATA, readonly=True)
        return cls(folder, info, index, store)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search(
        self, queries: np.ndarray, k: int, *, filters: dict[str, Any] | None = None
    ) -> list[list[Hit]]:
        """Top ``k`` live items per query, best first, with their metadata.

        ``filters`` keep items whose fields equal the given values (``kind``, ``group_id``,
        ``uri`` or any metadata key); k results come back whenever k items match. Removed items
        never appear: with a filter they are not among the allowed ids; without one, for index
        types that keep removed vectors, the search asks for k more per removed item and drops
        them.
        """
        scores, ids = self.nearest(queries, k, filters=filters)
        return self.hydrate(scores, ids, k)

    def nearest(
        self, queries: np.ndarray, k: int, *, filters: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The FAISS half of :meth:`search`: (scores, ids) [n, k'] with -1 padding, k' ≥ k
        when removed vectors may be among them; :meth:`hydrate` turns them into hits."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.info.dim:
            raise ValueError(f"queries must be [n, {self.info.dim}], got {queries.shape}")
        if filters:
            allowed = self.store.ids_matching(filters)
            if len(allowed) == 0:
                empty = np.zeros((len(queries), 0))
                return empty.astype(np.float32), empty.astype(np.int64)
            return search(self.index, queries, min(k, len(allowed)), allowed=allowed)
        wanted = min(k + self._tombstoned_in_index, self.index.ntotal)
        return search(self.index, queries, wanted)

    def hydrate(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[list[Hit]]:
        """Up to ``k`` hits per row of :meth:`nearest`'s result, removed items dropped."""
        # One metadata query for the whole batch; removed items come back as None.
        flat = [int(i) for i in np.unique(ids[ids >= 0])]
        found = dict(zip(flat, self.store.get(flat), strict=True))
        results = []
        for row_scores, row_ids in zip(scores, ids, strict=True):
            hits = []
            for score, item_id in zip(row_scores, row_ids, strict=True):
                item = found.get(int(item_id)) if item_id >= 0 else None
                if item is not None:
                    hits.append(Hit(int(item_id), float(score), item))
                if len(hits) == k:
                    break
            results.append(hits)
        return results
