"""What a sync must do: the folder's files compared with the items a collection holds.

The comparison costs what changed. A file whose size and mtime equal those recorded on its
item is unchanged and is never opened; only a file of the same size but another mtime is
hashed (a copy, a ``touch``, a restore from backup), and when its SHA-256 equals the recorded
one it is *touched*: re-added with its stored vector and fresh metadata instead of being
encoded, so the next sync finds its new mtime recorded and stats it only. A file of another
size cannot hold the same bytes, so it is re-encoded without being hashed first.

Items are matched to files by their ``path`` metadata (the file's POSIX path relative to the
synced folder, as ``indexer.media_scan`` names it); items without one (added through the API
or built from a CSV) are not the folder's and a sync leaves them alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from indexer.collection import Collection
from indexer.file_metadata import iso_mtime
from indexer.media_records import media_record
from indexer.media_scan import MediaFile
from indexer.metadata import Item
from indexer.segments import Segment
from model.data.records import ImageRecord, VideoRecord

logger = logging.getLogger("cots.index")

_HASH_BLOCK: Final = 1 << 20
Record = ImageRecord | VideoRecord


@dataclass
class Held:
    """A file the live version holds: its image or video item (what it recorded of the file)
    and every live id made from it (a video's segments too), with the segment of each."""

    primary: Item | None = None
    items: list[tuple[Item, Segment]] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [item.id for item, _ in self.items]

    def same_stat(self, file: MediaFile) -> bool:
        meta = self.primary.metadata if self.primary is not None else {}
        return bool(meta.get("file_size") == file.size and meta.get("mtime_ns") == file.mtime_ns)

    @property
    def sha256(self) -> str | None:
        value = self.primary.metadata.get("sha256") if self.primary is not None else None
        return value if isinstance(value, str) else None

    @property
    def size(self) -> int | None:
        value = self.primary.metadata.get("file_size") if self.primary is not None else None
        return value if isinstance(value, int) else None


def held_files(collection: Collection) -> tuple[dict[str, Held], int]:
    """The live items of ``collection`` by their source file's relative path, and how many
    live items name no file (a sync keeps them)."""
    deleted = set(collection.segments.deleted.tolist())
    kind = collection.info.kind
    held: dict[str, Held] = defaultdict(Held)
    foreign = 0
    for segment in collection.segments.segments:
        for item in segment.store.iter_items():
            if item.id in deleted:
                continue
            path = item.metadata.get("path")
            if not isinstance(path, str):
                foreign += 1
                continue
            entry = held[path]
            entry.items.append((item, segment))
            if item.kind == kind:
                entry.primary = item
    return dict(held), foreign


def file_record(file: MediaFile, caption_file: Path | None) -> Record:
    """The record a folder's file is encoded from, as a build of the folder makes it
    (``indexer.media_records``): its ``<stem>.txt`` caption when it has one."""
    captions: tuple[str, ...] = ()
    if caption_file is not None:
        try:
            lines = (line.strip() for line in caption_file.read_text(encoding="utf-8").splitlines())
            captions = tuple(caption for caption in dict.fromkeys(lines) if caption)
        except (OSError, UnicodeDecodeError) as error:  # costs the caption, not the item
            logger.warning("caption file %s cannot be read (%s)", caption_file, error)
    return media_record(file, captions, None)


def source_metadata(file: MediaFile, sha256: str) -> dict[str, Any]:
    """What an item records of its file (``indexer.file_metadata``'s keys), as the scan saw
    it: the next sync compares its scan with these."""
    return {
        "path": file.relpath,
        "folder": file.folder,
        "file_size": file.size,
        "mtime_ns": file.mtime_ns,
        "mtime": iso_mtime(file.mtime_ns),
        "sha256": sha256,
    }


class Hasher:
    """SHA-256 of files, counting the files it opens (what a sync's cost is measured by)."""

    def __init__(self) -> None:
        self.files = 0

    def __call__(self, path: Path) -> str:
        self.files += 1
        digest = hashlib.sha256()
        with path.open("rb") as stream:
            while block := stream.read(_HASH_BLOCK):
                digest.update(block)
        return digest.hexdigest()


def skip_reason(error: OSError) -> str:
    """A reading failure as a skipped-item reason (the category the reports count)."""
    if isinstance(error, FileNotFoundError | NotADirectoryError):
        return "missing file"
    if isinstance(error, PermissionError):
        return "permission denied"
    return f"unreadable file ({error.strerror or error})"


def drift(file: MediaFile) -> str | None:
    """None when ``file`` still has the size and mtime the scan saw, else why it is skipped
    this time: "missing file" (gone), "changed during sync" (the next sync takes it), or the
    reason it cannot be stat'ed."""
    try:
        now = os.stat(file.path)
    except OSError as error:
        return skip_reason(error)
    if (now.st_size, now.st_mtime_ns) != (file.size, file.mtime_ns):
        return "changed during sync"
    return None


@dataclass
class SyncPlan:
    """The files to encode, the files to re-add with their stored vectors, and the ids to
    remove, with the counts the report shows."""

    encode: list[MediaFile] = field(default_factory=list)  # new and changed, relpath order
    touched: list[tuple[MediaFile, Held, str]] = field(default_factory=list)  # + their sha256
    gone: dict[str, Held] = field(default_factory=dict)  # relpath -> held items to remove
    unchanged: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def removed_ids(self) -> np.ndarray:
        ids = [i for held in self.gone.values() for i in held.ids]
        return np.asarray(sorted(ids), dtype=np.int64)


def plan_sync(
    root: Path, files: list[MediaFile], held: dict[str, Held], hasher: Hasher
) -> SyncPlan:
    """Compare the ``files`` scanned under ``root`` with what the collection ``held``s (see
    the module docstring for what is opened when)."""
    plan = SyncPlan()
    for file in files:
        known = held.get(file.relpath)
        if known is None or known.primary is None:
            plan.encode.append(file)
        elif known.same_stat(file):
            plan.unchanged += 1
        elif known.sha256 is None or known.size != file.size:
            plan.encode.append(file)
        else:
            _compare_content(plan, file, known, hasher)
    listed = {file.relpath for file in files}
    for relpath, known in held.items():
        if relpath not in listed:
            _vanished(plan, root, relpath, known)
    return plan


def _compare_content(plan: SyncPlan, file: MediaFile, known: Held, hasher: Hasher) -> None:
    try:
        sha256 = hasher(file.path)
    except OSError as error:
        _unreadable(plan, file.relpath, known, skip_reason(error))
        return
    if sha256 != known.sha256:
        plan.encode.append(file)
        return
    reason = drift(file)  # written while we read it: the next sync looks again
    if reason is None:
        plan.touched.append((file, known, sha256))
    else:
        _unreadable(plan, file.relpath, known, reason)


def _unreadable(plan: SyncPlan, relpath: str, known: Held, reason: str) -> None:
    """A held file that could not be read: removed when it is gone, else kept as it was."""
    plan.skipped[reason] += 1
    if reason == "missing file":
        plan.gone[relpath] = known


def _vanished(plan: SyncPlan, root: Path, relpath: str, known: Held) -> None:
    """A held file the scan did not list: removed only when it is really gone. One that still
    exists sits in a folder the scan could not list (permission denied, a mount that came
    back half): its items are kept rather than lost on a passing fault."""
    try:
        os.lstat(root / relpath)
    except (FileNotFoundError, NotADirectoryError):
        plan.gone[relpath] = known
        return
    except OSError:
        pass
    plan.skipped["unreadable folder"] += 1
    logger.warning("kept %s: it exists but the scan could not list it", relpath)
