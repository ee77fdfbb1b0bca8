"""A folder of a user's own media, listed: which files are photos or videos, and why the rest
are not items.

The walk is the one thing a build from a folder, a sync and the quickstart share: it only
stats files (no file is opened), so listing an unchanged 100,000-file folder costs the
``stat`` calls alone. A file is an item when its extension names an image or video format we
decode; everything else is counted by reason and never silently dropped:

- hidden files and folders (``.DS_Store``, ``.thumbnails/``) — "hidden";
- symlinks whose target lies outside the root (a sync must not wander the disk) — "symlink
  leaves the root"; links inside the root are followed once (a looped link is not re-entered);
- files that are not media (``notes.txt``) — "not media"; a ``<stem>.txt`` beside a media
  file of the same stem is its caption, listed in ``MediaScan.captions``, not skipped;
- HEIC/HEIF/AVIF without the optional ``pillow-heif`` decoder — "needs pillow-heif";
- folders that cannot be listed (permission denied) — "unreadable folder".

Paths are returned sorted by their relative POSIX path, so ids follow the same order on every
platform and every run.
"""

from __future__ import annotations

import functools
import logging
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from indexer.errors import CollectionError

logger = logging.getLogger("cots.index")

MediaKind = Literal["image", "video"]

IMAGE_EXTENSIONS: Final = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
)
# Decoded through pillow-heif's Pillow plugin, an optional extra (`pip install
# 'cots-search[heic]'`); without it these files are skipped with that reason.
HEIF_EXTENSIONS: Final = frozenset({".heic", ".heif", ".avif"})
VIDEO_EXTENSIONS: Final = frozenset({".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v"})
MAX_EXAMPLES: Final = 20


CAPTION_SUFFIX: Final = ".txt"


@functools.cache
def heif_available() -> bool:
    """Whether HEIC/AVIF files can be decoded; registers pillow-heif's plugin with Pillow (once
    per process: a decoding worker calls it too, before its first image)."""
    try:
        import pillow_heif  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    if hasattr(pillow_heif, "register_avif_opener"):
        pillow_heif.register_avif_opener()
    return True


def media_kind(path: Path | str, *, heif: bool = True) -> MediaKind | None:
    """``image`` or ``video`` by extension, or None for a file that is not media we decode."""
    return _kind_of_suffix(os.path.splitext(str(path))[1].lower(), heif)


def _kind_of_suffix(suffix: str, heif: bool) -> MediaKind | None:
    if suffix in IMAGE_EXTENSIONS or (heif and suffix in HEIF_EXTENSIONS):
        return "image"
    if suffix in VIDEO_EXTENSIONS:
        return "video"
    return None


@dataclass(frozen=True, slots=True)
class MediaFile:
    """One media file under the scanned root, as ``stat`` saw it during the scan."""

    relpath: str  # POSIX, relative to the root: the item's stable name for a sync
    # root / relpath as a string (not resolved: a link inside the root keeps its own name); a
    # Path per file would cost a scan of 100,000 unchanged files about a second.
    location: str
    kind: MediaKind
    size: int
    mtime_ns: int

    @property
    def path(self) -> Path:
        return Path(self.location)

    @property
    def folder(self) -> str:
        """The relative folder ("" for the root itself)."""
        return self.relpath.rpartition("/")[0]


@dataclass
class MediaScan:
    """What a scan found: media files in order, and every other entry counted by reason."""

    root: Path
    files: list[MediaFile] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # relpath of a media file -> its <stem>.txt caption file (only those that exist)
    captions: dict[str, Path] = field(default_factory=dict)

    def skip(self, path: Path, reason: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append((str(path), reason))
        logger.info("not an item: %s (%s)", path, reason)

    def of_kind(self, kind: MediaKind) -> list[MediaFile]:
        return [file for file in self.files if file.kind == kind]

    def summary(self) -> str:
        counts = Counter(file.kind for file in self.files)
        text = f"{self.root}: {counts['image']:,} images, {counts['video']:,} videos"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(self.skipped.items()))
            text += f"; not items: {reasons}"
        return text


class MediaScanError(CollectionError):
    """The root itself cannot be scanned (missing, not a folder, unreadable)."""


def scan_media(root: Path | str, kinds: frozenset[MediaKind] | None = None) -> MediaScan:
    """Every media file under ``root`` (recursively) of ``kinds`` (None: images and videos).

    Files of a kind not asked for are not items here and are not counted as skipped (an image
    collection's scan of a folder with videos in it does not report them).
    """
    root = Path(root)
    try:
        if not root.is_dir():
            what = "does not exist" if not root.exists() else "is not a folder"
            raise MediaScanError(f"media folder {root} {what}")
        real_root = root.resolve(strict=True)
        os.listdir(root)
    except PermissionError as error:
        raise MediaScanError(f"media folder {root} cannot be read: {error.strerror}") from None
    wanted: frozenset[MediaKind] = kinds if kinds is not None else frozenset(("image", "video"))
    heif = heif_available()
    scan = MediaScan(root=root)
    seen_dirs = {real_root}
    _walk(scan, root, "", real_root, wanted, heif, seen_dirs)
    scan.files.sort(key=lambda file: file.relpath)
    return scan


def _walk(
    scan: MediaScan,
    folder: Path,
    prefix: str,
    real_root: Path,
    wanted: frozenset[MediaKind],
    heif: bool,
    seen_dirs: set[Path],
) -> None:
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
    except OSError as error:
        scan.skip(folder, f"unreadable folder ({error.strerror or error})")
        return
    sidecars: dict[str, Path] = {}  # stem -> a .txt in this folder, a caption if media shares it
    stems: dict[str, list[str]] = {}  # stem -> relpaths of this folder's media of wanted kinds
    others: set[str] = set()  # stems of media of kinds not asked for (their .txt is no note)
    for entry in entries:
        relpath = f"{prefix}{entry.name}"
        if entry.name.startswith("."):
            scan.skip(Path(entry.path), "hidden")
            continue
        try:
            if entry.is_symlink():
                target = Path(entry.path).resolve(strict=True)
                if not target.is_relative_to(real_root):
                    scan.skip(Path(entry.path), "symlink leaves the root")
                    continue
            info = entry.stat()  # follows a link inside the root
        except (OSError, RuntimeError) as error:  # RuntimeError: a symlink loop
            scan.skip(Path(entry.path), f"unreadable ({getattr(error, 'strerror', None) or error})")
            continue
        if stat.S_ISDIR(info.st_mode):
            path = Path(entry.path)
            real = path.resolve()
            if real in seen_dirs:
                continue  # a link back into a folder already walked
            seen_dirs.add(real)
            _walk(scan, path, f"{relpath}/", real_root, wanted, heif, seen_dirs)
            continue
        if not stat.S_ISREG(info.st_mode):
            scan.skip(Path(entry.path), "not a regular file")
            continue
        stem, suffix = os.path.splitext(entry.name)
        kind = _kind_of_suffix(suffix.lower(), heif)
        if kind is None:
            if suffix.lower() == CAPTION_SUFFIX:
                sidecars[stem] = Path(entry.path)  # decided once the whole folder is listed
            else:
                reason = "needs pillow-heif" if suffix.lower() in HEIF_EXTENSIONS else "not media"
                scan.skip(Path(entry.path), reason)
            continue
        if kind in wanted:
            scan.files.append(MediaFile(relpath, entry.path, kind, info.st_size, info.st_mtime_ns))
            stems.setdefault(stem, []).append(relpath)
        else:
            others.add(stem)
    for stem, path in sidecars.items():
        if stem in stems:
            for relpath in stems[stem]:
                scan.captions[relpath] = path
        elif stem not in others:
            scan.skip(path, "not media")
