"""Thumbnails of the media files items point to: ``GET .../items/{id}/media?w=256``.

A user's photos are 3-12 MB each and the page shows a grid of 12-50 hits, so the page asks for
a small JPEG instead. A thumbnail is ``w`` pixels wide (32 to 1024; never wider than the
source), keeps the aspect ratio, and is upright: the source is decoded as queries and the
indexer decode it (``runtime.image_decode``: ``to_rgb`` applies the EXIF orientation), except
that a JPEG is decoded at a reduced DCT scale (``Image.draft``) first, which makes a 12 MB
photo's thumbnail ~10x cheaper and bounds the memory of a 100-megapixel one. A video's
thumbnail is the frame at the moment's start (the first frame of a whole video), read with
PyAV after one seek.

Thumbnails are cached on disk (``thumbnail_dir``; default ``<index root>/.thumbnails``) under
the SHA-256 of (source path, size, mtime_ns, w, start): a changed file gets a new key, so the
cache never serves a stale picture and never needs invalidating (old entries are only disk
space; delete the folder at will). The key doubles as the ETag. Files are written to a
temporary name and renamed, so a reader never sees half a JPEG; when the folder cannot be
written (a read-only volume), the thumbnail is served from memory instead.

Everything here blocks (decoding, resizing, file I/O): call it from a thread, as the route
does (a plain ``def`` route runs in Starlette's thread pool). :data:`_RENDERS` bounds how
many thumbnails decode at once, since a page of 50 hits asks for 50 at the same moment.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from PIL import ExifTags, Image

from runtime.errors import DecodeError, ImageDecodeError, VideoDecodeError
from runtime.image_decode import decode_image, to_rgb
from runtime.images import ACCEPTED_FORMATS
from service.errors import InvalidInputError, NotFoundError, UnsupportedMediaError

log = logging.getLogger("cots.service")

MIN_WIDTH: Final = 32
MAX_WIDTH: Final = 1024
MEDIA_TYPE: Final = "image/jpeg"
VIDEO_SUFFIXES: Final = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi"})
_QUALITY: Final = 82
# Bumped when the output for the same source and width changes (quality, filter, format), so
# caches built by an older server are not served as if they were new.
_FORMAT_VERSION: Final = 1
# EXIF orientations that swap width and height (rotated by 90 or 270 degrees).
_TRANSPOSED: Final = frozenset({5, 6, 7, 8})
_JPEG_MAGIC: Final = b"\xff\xd8\xff"
# Decodes at once: more than the cores only queues inside Pillow and multiplies peak memory.
_RENDERS: Final = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """A rendered thumbnail: its cache file (None when the cache could not be written, then
    ``data`` holds the bytes) and its ETag."""

    etag: str
    path: Path | None
    data: bytes | None = None


def check_width(width: int) -> int:
    if not MIN_WIDTH <= width <= MAX_WIDTH:
        raise InvalidInputError(
            f"w: a thumbnail is {MIN_WIDTH} to {MAX_WIDTH} pixels wide, got {width}"
        )
    return width


def cache_key(source: Path, width: int, start_s: float | None) -> str:
    """The hex SHA-256 naming ``source``'s thumbnail: it changes whenever the file does
    (size or mtime); ``start_s`` is a video moment's start (None for images)."""
    try:
        stat = source.stat()
    except OSError as error:
        raise NotFoundError(f"the item's file is gone: {source.name}") from error
    at = "" if start_s is None else f"{start_s:.3f}"
    parts = (str(source.resolve()), stat.st_size, stat.st_mtime_ns, width, at, _FORMAT_VERSION)
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()


def cached_path(folder: Path, key: str) -> Path:
    # Two levels, so no one directory holds every thumbnail of a large library.
    return folder / key[:2] / f"{key}.jpg"


def thumbnail(
    source: Path, width: int, *, folder: Path, max_pixels: int, start_s: float | None = None
) -> Thumbnail:
    """``source``'s thumbnail ``width`` wide, from the cache in ``folder`` or rendered now.

    ``max_pixels`` bounds the decoded image (after a JPEG's reduced-scale decode). Raises
    :class:`NotFoundError` when the file is gone and :class:`UnsupportedMediaError` when it
    does not decode: never a bare exception that would read as the server's failure.
    """
    check_width(width)
    key = cache_key(source, width, start_s)
    path = cached_path(folder, key)
    if path.is_file():
        return Thumbnail(etag=key, path=path)
    with _RENDERS:
        data = render(source, width, max_pixels=max_pixels, start_s=start_s)
    try:
        _write_atomically(path, data)
    except OSError as error:
        log.warning("thumbnail cache %s not writable (%s); serving from memory", folder, error)
        return Thumbnail(etag=key, path=None, data=data)
    return Thumbnail(etag=key, path=path)


def render(source: Path, width: int, *, max_pixels: int, start_s: float | None = None) -> bytes:
    """The JPEG bytes of ``source``'s thumbnail, uncached."""
    try:
        if source.suffix.lower() in VIDEO_SUFFIXES:
            image = _video_frame(source, start_s or 0.0)
        else:
            image = to_rgb(_decode(_read(source), width, max_pixels))
    except DecodeError as error:
        raise UnsupportedMediaError(
            f"the item's file {source.name} cannot be made a thumbnail ({error}); "
            "ask without w for the file itself"
        ) from error
    return _encode(_shrink(image, width))


def _read(source: Path) -> bytes:
    try:
        return source.read_bytes()
    except FileNotFoundError as error:
        raise NotFoundError(f"the item's file is gone: {source.name}") from error
    except OSError as error:  # permission denied, a directory, an I/O error
        raise UnsupportedMediaError(f"the item's file {source.name} is unreadable") from error


def _decode(data: bytes, width: int, max_pixels: int) -> Image.Image:
    if data.startswith(_JPEG_MAGIC):
        return _decode_jpeg_reduced(data, width, max_pixels)
    return decode_image(data, max_pixels=max_pixels, formats=ACCEPTED_FORMATS)


def _decode_jpeg_reduced(data: bytes, width: int, max_pixels: int) -> Image.Image:
    """A JPEG decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that is still at least
    ``width`` wide once upright; errors as ``decode_image`` raises them."""
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
        stored_w, stored_h = image.size
        upright_w = stored_h if _orientation(image) in _TRANSPOSED else stored_w
        scale = min(1.0, width / max(upright_w, 1))
        image.draft(None, (math.ceil(stored_w * scale), math.ceil(stored_h * scale)))
        pixels = image.size[0] * image.size[1]
        if pixels > max_pixels:
            raise ImageDecodeError(
                "image too large", f"{image.size[0]}x{image.size[1]}, limit {max_pixels:,} pixels"
            )
        image.load()
    except ImageDecodeError:
        raise
    except Exception as error:
        # Pillow signals bad data with many types (OSError, SyntaxError, ValueError, the
        # decompression-bomb error); any of them means this one file is unusable.
        reason = "truncated image" if "truncated" in str(error).lower() else "corrupt image"
        raise ImageDecodeError(reason, f"{type(error).__name__}: {error}") from error
    return image


def _orientation(image: Image.Image) -> int:
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) else 1


def _video_frame(source: Path, start_s: float) -> Image.Image:
    """The first frame at or after ``start_s`` seconds (a seek to the keyframe before it,
    then decoding forward), so a moment late in a long video costs one GOP, not the video."""
    import av  # deferred, as runtime.video_decode does: ~0.15 s, and image users never need it

    if not source.is_file():
        raise NotFoundError(f"the item's file is gone: {source.name}")
    try:
        with av.open(str(source)) as container:
            if not container.streams.video:
                raise VideoDecodeError("corrupt video", f"{source.name}: no video stream")
            stream = container.streams.video[0]
            if start_s > 0 and stream.time_base is not None:
                container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
            last = None
            for frame in container.decode(stream):
                last = frame
                # Half a frame's slack: timestamps are rounded to the stream's time base.
                if frame.time is None or frame.time >= start_s - 0.02:
                    break
            if last is None:
                raise VideoDecodeError("corrupt video", f"{source.name}: no decodable frames")
            return last.to_image()
    except VideoDecodeError:
        raise
    except Exception as error:  # PyAV's own error types for unreadable data
        raise VideoDecodeError("corrupt video", f"{type(error).__name__}: {error}") from error


def _shrink(image: Image.Image, width: int) -> Image.Image:
    if image.width <= width:
        return image  # never upscale: a thumbnail is never more than the source holds
    height = max(1, round(image.height * width / image.width))
    # reducing_gap: a cheap box reduction first, then Lanczos over the last factor of 3.
    return image.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)


def _encode(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=_QUALITY)
    return out.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        # Two requests may render the same key at once: both write the same bytes, the
        # last rename wins, and a reader sees one whole file either way.
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
