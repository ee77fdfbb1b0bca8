"""What every corpus reader yields, and how it accounts for what it had to skip."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger("cots.data")


class CorpusError(Exception):
    """A corpus cannot be read at all (bad layout, unknown column, unreadable index file).

    Problems with single items are not errors: readers skip them and count them in a
    :class:`SkipReport`.
    """


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image and its captions as a corpus lists them, before the image is decoded.

    ``uri`` names the item for people and for the metadata store (a file path, or
    ``archive.tar#member`` for an item inside a WebDataset shard). Exactly one of ``path``
    (a file on disk) and ``data`` (bytes already read from an archive) is set.
    """

    uri: str
    captions: tuple[str, ...]
    group_id: str
    split: str | None = None
    path: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True, slots=True)
class ImageSample:
    """A record with its decoded image (mode as stored: RGB, RGBA, L, ...)."""

    record: ImageRecord
    image: Image.Image

    @property
    def captions(self) -> tuple[str, ...]:
        return self.record.captions

    @property
    def group_id(self) -> str:
        return self.record.group_id


@dataclass(frozen=True, slots=True)
class VideoRecord:
    """One video file and its captions, before decoding."""

    uri: str
    captions: tuple[str, ...]
    group_id: str
    path: Path
    split: str | None = None


@dataclass(frozen=True, slots=True)
class VideoSample:
    """A video record with sampled frames, uint8 array of shape (T, H, W, 3)."""

    record: VideoRecord
    frames: np.ndarray
    fps: float
    duration_s: float

    @property
    def captions(self) -> tuple[str, ...]:
        return self.record.captions

    @property
    def group_id(self) -> str:
        return self.record.group_id


@dataclass
class SkipReport:
    """Counts and explains every item a reader skipped, so no item is dropped silently.

    Each skip is logged at WARNING with the item's path and the reason; :meth:`summary` gives
    the totals for the end of a run.
    """

    source: str
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    examples: list[tuple[str, str]] = field(default_factory=list)
    max_examples: int = 20

    def keep(self) -> None:
        self.kept += 1

    def skip(self, where: str, reason: str, detail: str = "") -> None:
        """Record that the item at ``where`` was skipped; ``reason`` is a short category."""
        self.skipped[reason] += 1
        message = f"{reason}: {detail}" if detail else reason
        if len(self.examples) < self.max_examples:
            self.examples.append((where, message))
        logger.warning("skipped %s (%s)", where, message)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        text = f"{self.source}: read {self.kept:,} items, skipped {self.n_skipped:,}"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n:,}" for reason, n in sorted(self.skipped.items()))
            text += f" ({reasons})"
        return text
