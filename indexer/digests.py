"""SHA-256s of an index version's files: taken once when a file is written, checked when a
reader loads it.

``write_segment`` hashes a segment's files right after writing them (O(m) for an add of m
items, while they are still in the page cache) and records them in ``segment.json``. Each
version's ``index.json`` carries the digests of every file it reads, keyed by path: its delete
set (``deleted.npy``) and, for each segment it names, ``segments/<id>/segment.json`` and the
segment's own files. A new version copies the entries of the segments it keeps from the
version it was made from, so a segment is hashed once in its life, never again on a change.

A reader checks each file before loading it (a replica only the segments it does not hold
yet): the size always, then the SHA-256 — except for files of at least
:data:`FAST_PATH_BYTES` whose size *and* modification time (ns) are still those recorded, which
are trusted without reading them (a rewrite changes the modification time; a copy that keeps
it, as ``cp -p`` and ``shutil.copy2`` do, keeps the fast path; one that does not is hashed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from pydantic import BaseModel, ConfigDict, Field

from indexer.errors import CollectionError
from runtime.bundle import file_sha256

# Files this large are trusted on size and modification time: hashing a million-item
# segment's 500 MB of vectors would make a replica's cold start read every byte twice.
FAST_PATH_BYTES: Final = 64 * 2**20


class FileDigest(BaseModel):
    """What a file was when it was written."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)
    mtime_ns: int


def file_digest(path: Path) -> FileDigest:
    stat = path.stat()
    return FileDigest(sha256=file_sha256(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def check_file(path: Path, expected: FileDigest, label: str) -> None:
    """Raise :class:`CollectionError` naming ``label`` unless ``path`` is the file that was
    written (see the module docstring for the fast path)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise CollectionError(f"{label} is missing") from None
    damaged = "was changed or damaged after it was written; restore it or rebuild the collection"
    if stat.st_size != expected.size:
        raise CollectionError(
            f"{label} has {stat.st_size} bytes where index.json recorded {expected.size}: "
            f"it {damaged}"
        )
    if stat.st_size >= FAST_PATH_BYTES and stat.st_mtime_ns == expected.mtime_ns:
        return
    actual = file_sha256(path)
    if actual != expected.sha256:
        raise CollectionError(
            f"{label} does not match its SHA-256 in index.json (sha256 {actual[:12]}…, "
            f"expected {expected.sha256[:12]}…): it {damaged}"
        )
