"""Versions of a collection side by side, and the ``current`` pointer that readers follow.

``root/<collection>/versions/000007/`` holds one version's manifest (``index.json``, naming
its segments, and ``deleted.npy``, its delete set); the immutable segments it names live in
``root/<collection>/segments/<segment id>/`` and are shared by every version that names them.
``current`` is a symlink to one version. A new version is staged under a temporary name with
the segments it adds inside it (``<staging>/segments/<id>/``); :func:`publish` moves those
into ``segments/``, renames the version into place, and only then moves ``current``, by
renaming a new symlink over the old one (atomic on POSIX), so a reader sees the old version or
the new one, never half of one. Then versions beyond ``keep`` are deleted, and the segments no
kept version names. Versions written before segments (format 1) hold their files themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from indexer.errors import CollectionError
from indexer.index_bundle import SEGMENTS

VERSIONS = "versions"
CURRENT = "current"
_DIGITS = 6
STALE_STAGING_S = 24 * 3600  # the longest a build or compaction job may run (jobs.JOB_TIMEOUT_S)


def collection_dir(root: Path, collection: str) -> Path:
    return Path(root) / collection


def segments_dir(root: Path, collection: str) -> Path:
    return collection_dir(root, collection) / SEGMENTS


def version_dir(root: Path, collection: str, version: int) -> Path:
    return collection_dir(root, collection) / VERSIONS / f"{version:0{_DIGITS}d}"


def list_versions(root: Path, collection: str) -> list[int]:
    folder = collection_dir(root, collection) / VERSIONS
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())


def current_version(root: Path, collection: str) -> int | None:
    """The live version, or None for a collection with none yet."""
    link = collection_dir(root, collection) / CURRENT
    if not link.is_symlink():
        return None
    return int(Path(os.readlink(link)).name)


def current_dir(root: Path, collection: str) -> Path:
    version = current_version(root, collection)
    if version is None:
        known = (
            sorted(p.name for p in Path(root).iterdir() if p.is_dir())
            if Path(root).is_dir()
            else []
        )
        raise CollectionError(
            f"collection {collection!r} has no live version under {root} "
            f"(collections there: {', '.join(known) or 'none'}); build it with cots index build"
        )
    return version_dir(root, collection, version)


@contextmanager
def staging(root: Path, collection: str) -> Iterator[Path]:
    """A fresh folder to write a version into, on the same file system as the versions (so
    :func:`publish` can rename it), deleted if the block fails."""
    parent = collection_dir(root, collection) / VERSIONS
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".staging-", dir=parent))
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


@contextmanager
def locked(root: Path, collection: str) -> Iterator[None]:
    """The collection's publishing lock (an ``flock``, across processes): two changes finishing
    together must not take the same number, race on ``current`` or lose each other's edits.
    Not re-entrant: inside it, call :func:`publish` with ``held=True``."""
    folder = collection_dir(root, collection)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def publish(root: Path, collection: str, staged: Path, keep: int, *, held: bool = False) -> int:
    """Give the complete version in ``staged`` the next number, make it current, and delete
    the oldest versions beyond ``keep`` (never the current one) and the segments that no kept
    version names. The segments staged with it move into ``segments/`` first. Returns its
    number. ``held``: the caller holds :func:`locked` already."""
    with contextlib.nullcontext() if held else locked(root, collection):
        version = max(list_versions(root, collection), default=0) + 1
        target = version_dir(root, collection, version)
        _move_in(staged, segments_dir(root, collection), target)
        link = collection_dir(root, collection) / CURRENT
        fresh = link.with_name(f".{CURRENT}.{os.getpid()}")
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(Path(VERSIONS) / target.name)
        os.replace(fresh, link)
        for old in list_versions(root, collection)[:-keep]:
            if old != version:
                shutil.rmtree(version_dir(root, collection, old), ignore_errors=True)
        collect_segments(root, collection)
    return version


def _move_in(staged: Path, shared: Path, target: Path) -> None:
    """The staged version's new segments into ``shared``, then the version folder to
    ``target``. If either fails, the segments already moved go back into ``staged``: a segment
    outside a staging folder is always named by a version on disk, and the failed change's
    staging folder, deleted by :func:`staging`, takes its segments with it."""
    shared.mkdir(parents=True, exist_ok=True)
    added = staged / SEGMENTS
    moved: list[str] = []
    try:
        if added.is_dir():
            for segment in sorted(added.iterdir()):
                segment.rename(shared / segment.name)
                moved.append(segment.name)
            added.rmdir()
        staged.rename(target)
    except BaseException:
        if moved:
            added.mkdir(exist_ok=True)
            for name in moved:
                (shared / name).rename(added / name)
        raise


def named_segments(folder: Path) -> list[str]:
    """The segment ids a version's ``index.json`` names (none for a format-1 version)."""
    manifest = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    return [str(name) for name in manifest.get("segments", [])]


def reserve_numbers(root: Path, collection: str, count: int, floor: int) -> int:
    """The first of ``count`` item numbers no other change has taken, at least ``floor``: two
    adds encoding at once get disjoint id ranges, whichever publishes first."""
    with locked(root, collection):
        path = collection_dir(root, collection) / ".next-number"
        taken = int(path.read_text(encoding="utf-8")) if path.is_file() else 0
        first = max(taken, floor)
        path.write_text(str(first + count), encoding="utf-8")
    return first


def collect_segments(root: Path, collection: str) -> list[str]:
    """Delete the segments no version on disk names (returns their ids), and staging folders
    untouched for a day. Run under the lock (publish does): segments being written are still
    inside their staging folders then."""
    shared = segments_dir(root, collection)
    if not shared.is_dir():
        return []
    named: set[str] = set()
    for version in list_versions(root, collection):
        folder = version_dir(root, collection, version)
        if (folder / "index.json").is_file():
            named.update(named_segments(folder))
    doomed = [p.name for p in shared.iterdir() if p.is_dir() and p.name not in named]
    for name in doomed:
        shutil.rmtree(shared / name, ignore_errors=True)
    # Staging folders of changes killed before they published (with the segment they wrote):
    # none is still being written after a day, the longest a job may run.
    stale = time.time() - STALE_STAGING_S
    for folder in (collection_dir(root, collection) / VERSIONS).glob(".staging-*"):
        if folder.is_dir() and folder.stat().st_mtime < stale:
            shutil.rmtree(folder, ignore_errors=True)
    return sorted(doomed)
