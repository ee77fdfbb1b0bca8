"""The index bundle's schema: the layout of a version and its ``index.json``, the one
definition that the writers (``indexer.assemble``, ``indexer.update``, ``indexer.compaction``)
and the reader (``indexer.collection``) import.

A collection folder holds ``versions/<n>/`` (each an ``index.json`` and a delete set,
``deleted.npy``), ``segments/<id>/`` (immutable segments, ``indexer.segments``, shared by
versions) and a ``current`` pointer (``indexer.versions``). ``index.json`` names a version's
segments and carries the digest of every file it reads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from indexer.build_spec import CorpusKind
from indexer.digests import FileDigest
from indexer.errors import CollectionError, first_problem
from runtime.bundle import Modality

SEGMENTS: Final = "segments"  # in the collection folder; a staged version's new ones beside it
INDEX_JSON: Final = "index.json"
DELETED: Final = "deleted.npy"
FORMAT_VERSION: Final = 2  # 2: segments and a delete set; 1: one folder of files per version


class IndexInfo(BaseModel):
    """``index.json``: what a reader needs to trust and use a version."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format: Literal["cots-index-bundle"] = "cots-index-bundle"
    format_version: int = FORMAT_VERSION
    collection: str
    kind: CorpusKind
    modality: Modality  # what the vectors embed (image, text or video)
    count: int  # vectors in the segments (removed ones included until compacted)
    live: int
    dim: int
    factory: str
    metric: Literal["inner_product"] = "inner_product"
    model_bundle_id: str
    # Where that bundle was (resolved) when the collection was built, so `cots serve` and
    # `cots index sync` can find it without --bundle; None for versions written before.
    model_bundle_path: str | None = None
    recall_at_10: float  # against exact search, on up to 200 of the collection's vectors
    build: dict[str, Any]  # the BuildSpec of the first build, then what updates changed
    skipped: dict[str, int] = {}
    created: str
    segments: list[str] = []  # segment ids, in ascending id ranges (format 2)
    tombstones: int = 0  # ids in the delete set
    max_id: int = -1  # the largest id ever given: new items get larger ones, even after compaction
    # Every file the version reads -> its digest (``indexer.digests``): "deleted.npy" (in the
    # version folder) and "segments/<id>/<file>" (in the collection folder). Empty for
    # versions written before checksums: they are read unchecked.
    files: dict[str, FileDigest] = {}

    def write(self, folder: Path) -> None:
        (folder / INDEX_JSON).write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")


def segment_file_key(segment_id: str, name: str) -> str:
    return f"{SEGMENTS}/{segment_id}/{name}"


def read_info(folder: Path) -> IndexInfo:
    """A version's ``index.json``; :class:`CollectionError` if it is not one we can read
    (damaged, or written by a newer format), ``OSError`` if it cannot be read at all."""
    path = folder / INDEX_JSON
    raw = path.read_bytes()
    try:
        return IndexInfo.model_validate(json.loads(raw))
    except ValidationError as error:  # JSON, but not this schema (or a newer one)
        reason = first_problem(error)
        raise CollectionError(f"{path} is not a readable index.json: {reason}") from None
    except (ValueError, RecursionError) as error:  # not JSON, not UTF-8, nested too deep
        reason = f"{type(error).__name__}: {error}"
        raise CollectionError(f"{path} is not a readable index.json: {reason}") from None
