"""Reading a collection's live version: search with metadata, filters and tombstones.

A :class:`Collection` is one version: its ``index.json``, the segments it names and its delete
set, searched as one index (``indexer.segments.SegmentedIndex``). The service keeps one per
collection and swaps it when told a new version is live; opening the new one with
``previous=`` the served one reuses the segments both name (same id: same immutable files),
so a swap after an add loads only the added segment. Opening checks that the version was built
by the model bundle the caller embeds queries with.

Format-1 versions (written before segments: one folder holding every file) are served as one
segment whose tombstones are in its metadata; changes to them are refused until
``cots index compact`` rewrites them as segments.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from indexer.digests import check_file
from indexer.errors import CollectionError
from indexer.faiss_index import to_serving_device
from indexer.filters import Filter
from indexer.index_bundle import DELETED, IndexInfo, read_info, segment_file_key
from indexer.metadata import Item
from indexer.rescore import check_rescore
from indexer.segments import (
    SEGMENT_IDS,
    SEGMENT_INDEX,
    SEGMENT_JSON,
    SEGMENT_METADATA,
    SEGMENT_VECTORS,
    Hit,
    Segment,
    SegmentedIndex,
)
from indexer.versions import collection_dir, current_dir, segments_dir, version_dir

logger = logging.getLogger("cots.index")

__all__ = ["Collection", "Hit", "missing_files"]


class Collection:
    def __init__(self, folder: Path, info: IndexInfo, segments: SegmentedIndex) -> None:
        self.folder = folder
        self.info = info
        self.segments = segments
        self.version = int(folder.name)
        # Segments this version loaded itself (the rest were reused from the previous one).
        self.loaded: list[str] = []
        self._size: int | None = None

    @classmethod
    def open(
        cls,
        root: Path,
        name: str,
        *,
        bundle_id: str | None = None,
        version: int | None = None,
        previous: Collection | None = None,
        use_gpu: bool | None = False,
        with_indexes: bool = True,
        mmap: bool = False,
        rescore: int | None = None,
    ) -> Collection:
        """The live version of ``name`` (or ``version``). With ``bundle_id``, a version built by
        another model bundle is refused: its vectors live in another space. Segments that
        ``previous`` holds are shared with it, not loaded again; new ones go to the GPU when
        ``use_gpu`` says so (None: when FAISS sees one). ``with_indexes=False`` skips loading the
        FAISS indexes, for changes that read ids and metadata only.

        ``mmap=True`` (serving) maps the new segments' index data and ids from their files
        instead of reading them: replicas on a host share the page cache, and the indexes are
        read-only (reused segments keep how they were opened). ``rescore``: candidates per
        result that lossy segments rescore exactly (None: ``segments.default_rescore`` of each
        segment's size)."""
        if rescore is not None:
            check_rescore(rescore)  # before anything is opened
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
        if info.format_version == 1:
            segment = Segment.of_format_1(
                folder, info.dim, info.factory, info.recall_at_10,
                with_index=with_indexes, mmap=mmap,
            )  # fmt: skip
            _to_device(segment, use_gpu)
            removed = segment.store.removed_ids()
            opened = cls(folder, info, SegmentedIndex([segment], removed, rescore=rescore))
            opened.loaded = [segment.id]
            return opened
        held = {s.id: s for s in previous.segments.segments} if previous is not None else {}
        segments: list[Segment] = []
        loaded: list[str] = []
        if not info.files:
            logger.warning(
                "collection %s version %s carries no file checksums (written before them): "
                "its files are read unchecked until it is rebuilt or compacted",
                name,
                folder.name,
            )
        try:
            _check(info, folder, DELETED, folder / DELETED, name)
            for segment_id in info.segments:
                if segment_id in held:
                    reused = held[segment_id]
                    reused.users += 1
                    segments.append(reused)
                    continue
                prefix = segment_file_key(segment_id, "")
                for key in sorted(k for k in info.files if k.startswith(prefix)):
                    _check(info, folder, key, collection_dir(root, name) / key, name)
                segment = Segment(
                    segments_dir(root, name) / segment_id, with_index=with_indexes, mmap=mmap
                )
                _to_device(segment, use_gpu)
                segments.append(segment)
                loaded.append(segment_id)
            deleted = np.load(folder / DELETED)
        except BaseException:
            for segment in segments:
                segment.close()
            raise
        opened = cls(folder, info, SegmentedIndex(segments, deleted, rescore=rescore))
        opened.loaded = loaded
        return opened

    def close(self) -> None:
        self.segments.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        filters: Filter | Mapping[str, Any] | None = None,
        rescore: int | None = None,
    ) -> list[list[Hit]]:
        """Top ``k`` live items per query, best first, with their metadata.

        ``filters`` keep the items that match them (``indexer.filters``: equality, ``in``,
        ``ne``, ranges, ``exists`` and ``any_of`` on ``kind``, ``group_id``, ``uri`` or any
        metadata key); k results come back whenever k items match. Removed items never appear
        (see ``indexer.segments``). ``rescore``: see :meth:`nearest`.
        """
        scores, ids = self.nearest(queries, k, filters=filters, rescore=rescore)
        return self.hydrate(scores, ids, k)

    def nearest(
        self,
        queries: np.ndarray,
        k: int,
        *,
        filters: Filter | Mapping[str, Any] | None = None,
        rescore: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The FAISS half of :meth:`search`: (scores, ids) [n, k] with -1 padding;
        :meth:`hydrate` turns them into hits. Lossy segments (PQ, SQ8) rank ``k x rescore``
        candidates by their exact scores (None: the ``rescore`` this version was opened with;
        1: their codes' scores)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.info.dim:
            raise ValueError(f"queries must be [n, {self.info.dim}], got {queries.shape}")
        return self.segments.nearest(queries, k, filters=filters, rescore=rescore)

    def hydrate(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[list[Hit]]:
        """Up to ``k`` hits per row of :meth:`nearest`'s result, removed items dropped."""
        return self.segments.hydrate(scores, ids, k)

    def get(self, ids: Sequence[int] | np.ndarray) -> list[Item | None]:
        """The live items of ``ids`` in that order, None for unknown or removed ids."""
        found = self.segments.items(np.asarray(ids, dtype=np.int64))
        return [found.get(int(i)) for i in ids]

    def stored_vectors(self, ids: Sequence[int] | np.ndarray) -> dict[int, np.ndarray]:
        """The stored float32 copies (from float16 for compressed indexes, so not exactly
        unit length) of the live ``ids``; unknown and removed ids are left out. Read from the
        segments' memory-mapped vectors: no encoder, no index reconstruction."""
        wanted = np.asarray(ids, dtype=np.int64)
        wanted = wanted[~np.isin(wanted, self.segments.deleted)]
        found: dict[int, np.ndarray] = {}
        for segment in self.segments.segments:
            mine = wanted[segment.holds(wanted)]
            if len(mine):
                found.update(zip(mine.tolist(), segment.lookup(mine), strict=True))
        return found

    def ids_matching(self, filters: Filter | Mapping[str, Any] | None) -> np.ndarray:
        """Live ids (ascending) that match ``filters``."""
        return self.segments.ids_matching(filters)

    def size_bytes(self) -> int:
        """Bytes on disk of the segments this version names and its own files (measured once:
        they never change)."""
        if self._size is None:
            folders = {self.folder, *(s.folder for s in self.segments.segments)}
            self._size = sum(p.stat().st_size for f in folders for p in f.iterdir() if p.is_file())
        return self._size


def missing_files(root: Path, name: str, folder: Path) -> list[str]:
    """What a version folder lacks to be complete (its own files and the files of every
    segment it names); empty for a complete one."""
    if not (folder / "index.json").is_file():
        return ["index.json"]
    info = read_info(folder)
    files = (SEGMENT_INDEX, SEGMENT_IDS, SEGMENT_VECTORS, SEGMENT_METADATA)
    if info.format_version == 1:
        wanted = [folder / n for n in files]
    else:
        wanted = [folder / DELETED]
        for segment_id in info.segments:
            segment = segments_dir(root, name) / segment_id
            wanted += [segment / n for n in (*files, SEGMENT_JSON)]
    return [str(path.relative_to(folder.parent.parent)) for path in wanted if not path.is_file()]


def _check(info: IndexInfo, folder: Path, key: str, path: Path, name: str) -> None:
    """Check one file against the digest ``index.json`` records for it (none recorded: a
    version written before checksums, or a file it does not read)."""
    expected = info.files.get(key)
    if expected is not None:
        check_file(path, expected, f"collection {name!r} version {folder.name}: {key}")


def _to_device(segment: Segment, use_gpu: bool | None) -> None:
    if segment.index is not None and use_gpu is not False:
        segment.index = to_serving_device(segment.index, use_gpu)
