"""The runtime's exception types, under one base: :class:`BundleRuntimeError`.

``BundleError``: a model bundle cannot be used. ``InputError``: one input (an image, a video,
a text) cannot be encoded. ``DecodeError`` (``ImageDecodeError``, ``VideoDecodeError``): bytes
or a file that cannot become pixels, with a short ``reason`` a corpus reader counts by and a
``detail``. Every message says what is wrong and with which file.
"""

from __future__ import annotations


class BundleRuntimeError(Exception):
    """Base of every error the model-bundle runtime raises on purpose."""


class BundleError(BundleRuntimeError):
    """A model bundle cannot be used: missing files, wrong hash, unknown format version, ..."""


class InputError(BundleRuntimeError, ValueError):
    """One input (an image, a video, a text) cannot be encoded: corrupt, truncated, too large."""


class DecodeError(BundleRuntimeError, ValueError):
    """Media that cannot be decoded; ``reason`` is a short category, ``detail`` the rest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ImageDecodeError(DecodeError):
    """Bytes that cannot become an image. Reasons: "corrupt image" (not an image, or
    undecodable), "truncated image" (data ends early), "image too large" (over the pixel
    limit)."""


class VideoDecodeError(DecodeError):
    """A file that cannot become frames. Reasons: "missing file", "corrupt video" (no video
    stream, no decodable frame, or data PyAV cannot read)."""
