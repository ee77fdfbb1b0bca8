"""Corpus readers, writers and the synthetic corpus generator.

Torch-free: the indexer and the service use these readers too.
"""

from model.data.records import (
    CorpusError,
    ImageRecord,
    ImageSample,
    SkipReport,
    VideoRecord,
    VideoSample,
)

__all__ = [
    "CorpusError",
    "ImageRecord",
    "ImageSample",
    "SkipReport",
    "VideoRecord",
    "VideoSample",
]
