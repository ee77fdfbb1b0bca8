"""What every corpus reader shares: the per-item error, image decoding, and the read loop.

A reader lists records cheaply (``records()``) and decodes them on demand (``samples()``).
Items that cannot be used are skipped and counted in ``reader.report``; only a corpus that
cannot be read at all raises :class:`~model.data.records.CorpusError`, and it does so up front.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from PIL import Image

from model.data.records import ImageRecord, ImageSample, SkipReport
from runtime.errors import ImageDecodeError
from runtime.image_decode import decode_image

logger = logging.getLogger("cots.data")


class BadItemError(Exception):
    """One item cannot be used; readers catch it, report it and go on.

    ``reason`` is a short category that :class:`SkipReport` counts ("missing file", "corrupt
    image", "empty caption", "image too large", ...); ``detail`` says what exactly was wrong.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def load_image(record: ImageRecord) -> Image.Image:
    """Decode the image of ``record`` fully, in the mode it is stored in.

    Raises :class:`BadItemError` for a missing or unreadable file, bytes that are not an image,
    a truncated or corrupt file, and an image over ``PIL.Image.MAX_IMAGE_PIXELS``.
    """
    if record.data is not None:
        data = record.data
    elif record.path is not None:
        try:
            # Read the bytes ourselves so no file handle outlives a failed decode.
            data = record.path.read_bytes()
        except FileNotFoundError as error:
            raise BadItemError("missing file", str(record.path)) from error
        except OSError as error:
            raise BadItemError("unreadable file", f"{record.path}: {error}") from error
    else:
        raise BadItemError("missing file", f"{record.uri}: record has neither path nor data")
    try:
        return decode_image(data, max_pixels=None)
    except ImageDecodeError as error:
        if error.reason == "truncated image":
            # Skip reports count a truncated file as a corrupt image, as they always have.
            raise BadItemError("corrupt image", str(error)) from error
        raise BadItemError(error.reason, error.detail) from error


class _HasUri(Protocol):
    @property
    def uri(self) -> str: ...


R = TypeVar("R", bound=_HasUri)
S = TypeVar("S")


class CorpusReader(ABC, Generic[R, S]):
    """Lists records of type ``R`` and decodes them into samples of type ``S``.

    Every pass (a call to ``records()`` or ``samples()`` iterated to its first item) starts a
    fresh :attr:`report`, so counting the records and then reading the samples does not count
    skips twice.
    """

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        self.report = SkipReport(source=self.source)

    def _start_pass(self) -> SkipReport:
        """Call at the start of ``records()``: a new pass gets a new report."""
        self.report = SkipReport(source=self.source)
        return self.report

    @abstractmethod
    def records(self) -> Iterator[R]:
        """Yield usable records, cheaply; report and skip missing files and empty captions."""

    @abstractmethod
    def decode(self, record: R) -> S:
        """Decode one record; raise :class:`BadItemError` when it cannot be used."""

    def samples(self) -> Iterator[S]:
        """Yield decoded samples; report and skip items that fail to decode."""
        try:
            for record in self.records():
                try:
                    sample = self.decode(record)
                except BadItemError as error:
                    self.report.skip(record.uri, error.reason, error.detail)
                    continue
                self.report.keep()
                yield sample
        finally:
            # Also on an early stop, so a partial read still says what it saw.
            logger.info("%s", self.report.summary())


class ImageReader(CorpusReader[ImageRecord, ImageSample]):
    """Base of the image corpus readers: subclasses implement :meth:`records`."""

    def decode(self, record: ImageRecord) -> ImageSample:
        return ImageSample(record=record, image=load_image(record))
