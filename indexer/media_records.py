"""A user's own media as records for a build: each record knows its path relative to the
corpus, which becomes the item's ``path`` and ``folder`` metadata (``indexer.file_metadata``).

An image or video folder is listed by ``indexer.media_scan`` (recursively, by stat alone);
a ``<stem>.txt`` beside a file is its caption when present, never required. Records of a CSV,
TSV or Karpathy JSON get their path relative to that file's folder. A folder that holds no
media of the kind asked for is a :class:`CollectionError` that says what the folder holds
instead, so a user pointing at the wrong folder learns why at once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

from indexer.errors import CollectionError
from indexer.media_scan import MediaFile, MediaKind, MediaScan, MediaScanError, scan_media
from model.data.records import ImageRecord, VideoRecord

logger = logging.getLogger("cots.index")

Record = ImageRecord | VideoRecord
_EXAMPLES_PER_REASON = 3


@dataclass(frozen=True, slots=True)
class MediaImageRecord(ImageRecord):
    """An image record with its POSIX path relative to the corpus folder."""

    relpath: str | None = None


@dataclass(frozen=True, slots=True)
class MediaVideoRecord(VideoRecord):
    """A video record with its POSIX path relative to the corpus folder."""

    relpath: str | None = None


def record_relpath(record: Record) -> str | None:
    """The record's path relative to its corpus, when it has one (an archive member has not)."""
    return getattr(record, "relpath", None)


def list_media_folder(
    root: Path, kind: MediaKind, split: str | None
) -> tuple[list[Record], dict[str, int]]:
    """Records of every ``kind`` file under ``root`` (sorted by relative path) and what the
    scan skipped, per reason. ``split`` is recorded on every item as a label (a folder has
    no splits of its own), as the folder reader does."""
    try:
        # Both kinds, so that a folder of videos indexed as images can say so.
        scan = scan_media(root)
    except MediaScanError as error:
        raise CollectionError(str(error)) from None
    files = scan.of_kind(kind)
    if not files:
        raise CollectionError(no_media_message(scan, kind))
    records = [
        media_record(file, _captions(scan.captions.get(file.relpath)), split) for file in files
    ]
    logger.info("%s", scan.summary())
    return records, dict(scan.skipped)


def media_record(file: MediaFile, captions: tuple[str, ...], split: str | None) -> Record:
    """The record of one scanned file. Its group id is the relative path without extension,
    as the folder reader's, so that an image and a caption collection of one folder agree."""
    group_id = str(PurePosixPath(file.relpath).with_suffix(""))
    record = MediaVideoRecord if file.kind == "video" else MediaImageRecord
    return record(
        uri=str(file.path),
        captions=captions,
        group_id=group_id,
        split=split,
        path=file.path,
        relpath=file.relpath,
    )


def with_relpaths(records: Sequence[Record], root: Path) -> list[Record]:
    """``records`` of a corpus file (CSV, TSV, JSON) with their paths relative to ``root``, its
    folder; a file listed outside it keeps its path as written. Archive members stay as they
    are (they have no file of their own)."""
    result: list[Record] = []
    for record in records:
        if record.path is None:
            result.append(record)
            continue
        try:
            relpath = record.path.relative_to(root).as_posix()
        except ValueError:
            relpath = record.path.as_posix()
        values = {field.name: getattr(record, field.name) for field in fields(record)}
        cls = MediaVideoRecord if isinstance(record, VideoRecord) else MediaImageRecord
        result.append(cls(**values, relpath=relpath))
    return result


def no_media_message(scan: MediaScan, kind: MediaKind) -> str:
    """``photos holds no images (it holds 2 videos: index them with --kind video; 3 files are
    not media: notes.txt, a.pdf, b.doc)``: what the folder holds instead of ``kind`` files."""
    found: list[str] = []
    other: MediaKind = "video" if kind == "image" else "image"
    others = len(scan.of_kind(other))
    if others:
        plural = "s" if others != 1 else ""
        found.append(f"it holds {others:,} {other}{plural} (index {other}s with --kind {other})")
    for reason, count in sorted(scan.skipped.items()):
        names = [Path(path).name for path, why in scan.examples if why == reason]
        shown = ", ".join(names[:_EXAMPLES_PER_REASON])
        shown += ", ..." if count > _EXAMPLES_PER_REASON else ""
        files = "file is" if count == 1 else "files are"
        label = f"{count:,} {files} not media" if reason == "not media" else f"{count:,} {reason}"
        found.append(f"{label}: {shown}")
    return f"{scan.root} holds no {kind}s ({'; '.join(found) or 'it is empty'})"


def _captions(path: Path | None) -> tuple[str, ...]:
    """The caption lines of a ``<stem>.txt`` (one caption per non-empty line, de-duplicated),
    () without one. One that cannot be read costs the caption, not the item."""
    if path is None:
        return ()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        logger.warning("caption file %s cannot be read (%s); item kept without it", path, error)
        return ()
    lines = (line.strip() for line in text.splitlines())
    return tuple(caption for caption in dict.fromkeys(lines) if caption)
