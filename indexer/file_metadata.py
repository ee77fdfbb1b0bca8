"""Metadata read from a media file itself, stored in its item's ``metadata`` so that the filter
language (``indexer.filters``) can select on it: ``--where 'taken>=2024-06-01'``.

Data flow, in a decoding worker (``indexer.shards._prepare_image`` / ``_prepare_video``)::

    record (relpath from the listing, indexer.media_records)
      -> read_media_file: the file's bytes and its fstat, one read
      -> runtime.image_decode.decode_image_bounded: the pixels the model sees, and the header
      -> file_fields + image_fields (or video_fields): flat JSON values
      -> Item.metadata -> the segment's SQLite (``taken`` and ``folder`` indexed) -> filters

The key names are a contract (the sync, the API's sort and the page read them):

=================  ===========================================================================
``path``           POSIX path relative to the corpus folder (a CSV's: relative to its folder)
``folder``         its folder, ``""`` at the root
``file_size``      bytes (int)
``mtime``          modification time, ISO 8601 UTC ``YYYY-MM-DDTHH:MM:SSZ``
``mtime_ns``       modification time in ns since the epoch (int), as ``os.stat`` gives it
``sha256``         hex digest of the file's bytes
``width``          pixels, upright (after the EXIF orientation)
``height``         pixels, upright
``taken``          EXIF DateTimeOriginal, else DateTime: ``YYYY-MM-DDTHH:MM:SS``, no zone
``camera_make``    EXIF Make, stripped
``camera_model``   EXIF Model, stripped
``gps_lat``        signed decimal degrees (float, south negative)
``gps_lon``        signed decimal degrees (float, west negative)
``duration_s``     a video's length in seconds (float)
=================  ===========================================================================

A key whose value is unknown is left out, never stored as null: ``{"taken": {"exists":
true}}`` then means "has a date". EXIF that cannot be parsed costs its fields, never the item.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from PIL import ExifTags, Image

from model.data.readers import BadItemError

logger = logging.getLogger("cots.index")

TAKEN_FORMAT: Final = "%Y-%m-%dT%H:%M:%S"
MTIME_FORMAT: Final = "%Y-%m-%dT%H:%M:%SZ"
# EXIF orientations 5-8 turn the picture a quarter turn: its upright width is the stored height.
_QUARTER_TURNS: Final = frozenset({5, 6, 7, 8})
_EXIF_DATE_FORMAT: Final = "%Y:%m:%d %H:%M:%S"


def read_media_file(path: Path) -> tuple[bytes, os.stat_result]:
    """The file's bytes and its ``fstat``, taken on the same open file, so the size, mtime
    and hash stored describe exactly the bytes that were embedded. Raises
    :class:`BadItemError` "missing file" (deleted since the listing) or "unreadable file"."""
    try:
        with path.open("rb") as file:
            stat = os.fstat(file.fileno())
            return file.read(), stat
    except FileNotFoundError as error:
        raise BadItemError("missing file", str(path)) from error
    except OSError as error:  # permission denied, a folder where a file was, I/O errors
        raise BadItemError("unreadable file", f"{path}: {error.strerror or error}") from error


def hash_media_file(path: Path) -> tuple[str, os.stat_result]:
    """The sha256 of a file too large to hold in memory (a video), read in blocks, and its
    ``fstat``; errors as :func:`read_media_file`'s."""
    try:
        with path.open("rb") as file:
            stat = os.fstat(file.fileno())
            digest = hashlib.file_digest(file, "sha256")
            return digest.hexdigest(), stat
    except FileNotFoundError as error:
        raise BadItemError("missing file", str(path)) from error
    except OSError as error:
        raise BadItemError("unreadable file", f"{path}: {error.strerror or error}") from error


def file_fields(
    relpath: str | None, stat: os.stat_result | None, *, size: int, sha256: str
) -> dict[str, Any]:
    """``path``, ``folder``, ``file_size``, ``mtime``, ``mtime_ns`` and ``sha256`` of a file
    (``relpath`` None: an archive member, which has no path of its own; ``stat`` None: no
    file times)."""
    fields: dict[str, Any] = {}
    if relpath:
        fields["path"] = relpath
        fields["folder"] = relpath.rpartition("/")[0]
    fields["file_size"] = size
    if stat is not None:
        fields["mtime"] = iso_mtime(stat.st_mtime_ns)
        fields["mtime_ns"] = stat.st_mtime_ns
    fields["sha256"] = sha256
    return fields


def iso_mtime(mtime_ns: int) -> str:
    """``mtime_ns`` as ISO 8601 UTC to the second (``2024-06-01T10:00:00Z``)."""
    seconds = mtime_ns // 1_000_000_000  # floor, also before 1970: the second it falls in
    return datetime.fromtimestamp(seconds, UTC).strftime(MTIME_FORMAT)


def image_fields(image: Image.Image, full_size: tuple[int, int]) -> dict[str, Any]:
    """``width``, ``height`` (upright) and the EXIF fields of a decoded image, ``full_size``
    its size before any reduced decoding (``runtime.image_decode.BoundedImage``)."""
    try:
        exif = image.getexif()
    except Exception as error:  # Pillow parses EXIF lazily; damaged EXIF raises anything
        logger.info("unreadable EXIF (%s: %s); the image is kept", type(error).__name__, error)
        exif = Image.Exif()
    width, height = full_size
    if _safe(lambda: exif.get(ExifTags.Base.Orientation), None) in _QUARTER_TURNS:
        width, height = height, width
    fields: dict[str, Any] = {"width": width, "height": height}
    fields |= exif_fields(exif)
    return fields


def exif_fields(exif: Image.Exif) -> dict[str, Any]:
    """``taken``, ``camera_make``, ``camera_model``, ``gps_lat`` and ``gps_lon``, those present."""
    fields: dict[str, Any] = {}
    details = _safe(lambda: exif.get_ifd(ExifTags.IFD.Exif), {})
    taken = _exif_datetime(details.get(ExifTags.Base.DateTimeOriginal))
    taken = taken or _exif_datetime(exif.get(ExifTags.Base.DateTime))
    if taken:
        fields["taken"] = taken
    for key, tag in (("camera_make", ExifTags.Base.Make), ("camera_model", ExifTags.Base.Model)):
        text = _exif_text(exif.get(tag))
        if text:
            fields[key] = text
    gps = _safe(lambda: exif.get_ifd(ExifTags.IFD.GPSInfo), {})
    latitude = _coordinate(gps, ExifTags.GPS.GPSLatitude, ExifTags.GPS.GPSLatitudeRef, "S", 90)
    longitude = _coordinate(gps, ExifTags.GPS.GPSLongitude, ExifTags.GPS.GPSLongitudeRef, "W", 180)
    if latitude is not None and longitude is not None:  # half a position places nothing
        fields["gps_lat"] = latitude
        fields["gps_lon"] = longitude
    return fields


def video_fields(path: Path, duration_s: float) -> dict[str, Any]:
    """``duration_s``, and ``width``/``height`` of the first video stream as the container
    declares them (a header read; a rotation flag of a phone video is not applied)."""
    fields: dict[str, Any] = {}
    if duration_s > 0 and math.isfinite(duration_s):
        fields["duration_s"] = round(duration_s, 3)
    try:
        import av  # deferred, as runtime.video_decode does: image-only builds never need it

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
    except Exception as error:  # the frames decoded; a header PyAV reads oddly costs only this
        logger.info("no frame size for %s (%s)", path, error)
        return fields
    if width and height:
        fields["width"], fields["height"] = int(width), int(height)
    return fields


def _safe(read: Any, default: Any) -> Any:
    try:
        return read()
    except Exception:  # a damaged IFD: that field is unknown, the rest may still be fine
        return default


def _exif_text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        return None
    text = value.replace("\x00", "").strip()
    return text or None


def _exif_datetime(value: object) -> str | None:
    """EXIF's ``YYYY:MM:DD HH:MM:SS`` as ISO ``YYYY-MM-DDTHH:MM:SS``; None for an empty or
    placeholder date (cameras write ``0000:00:00 00:00:00`` when their clock is unset)."""
    text = _exif_text(value)
    if text is None:
        return None
    try:
        return datetime.strptime(text[:19], _EXIF_DATE_FORMAT).strftime(TAKEN_FORMAT)
    except ValueError:
        return None


def _coordinate(
    gps: Mapping[int, Any], value_tag: int, ref_tag: int, negative: str, limit: float
) -> float | None:
    """Degrees, minutes, seconds (rationals) and a hemisphere letter as signed degrees."""
    parts = gps.get(value_tag)
    try:
        degrees, minutes, seconds = (float(part) for part in parts or ())
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    value = degrees + minutes / 60 + seconds / 3600
    if not math.isfinite(value) or value > limit or min(degrees, minutes, seconds) < 0:
        return None  # a zero denominator reads as nan; nothing past the pole is a place
    if _exif_text(gps.get(ref_tag)) == negative:
        value = -value
    return round(value, 7)  # about a centimetre: more digits are noise
