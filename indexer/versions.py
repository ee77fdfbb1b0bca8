"""Versions of a collection side by side, and the ``current`` pointer that readers follow.

``root/<collection>/versions/000007/`` holds one complete index bundle; ``current`` is a
symlink to one of them. A new version is written under a temporary name, renamed into place
when complete, and only then does ``current`` move, by renaming a new symlink over the old one
(atomic on POSIX), so a reader sees the old version or the new one, never half of one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from indexer.errors import CollectionError

VERSIONS = "versions"
CURRENT = "current"
_DIGITS = 6


def collection_dir(root: Path, collection: str) -> Path:
    return Path(root) / collection


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
def _locked(root: Path, collection: str) -> Iterator[None]:
    # Two builds finishing together must not take the same number or race on `current`.
    folder = collection_dir(root, collection)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def publish(root: Path, collection: str, staged: Path, keep: int) -> int:
    """Give the complete version in ``staged`` the next number, make it current, and delete
    the oldest versions beyond ``keep`` (never the current one). Returns its number."""
    with _locked(root, collection):
        version = max(list_versions(root, collection), default=0) + 1
        target = version_dir(root, collection, version)
        staged.rename(target)
        link = collection_dir(root, collection) / CURRENT
        fresh = link.with_name(f".{CURRENT}.{os.getpid()}")
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(Path(VERSIONS) / target.name)
        os.replace(fresh, link)
        for old in list_versions(root, collection)[:-keep]:
            if old != version:
                shutil.rmtree(version_dir(root, collection, old), ignore_errors=True)
    return version
