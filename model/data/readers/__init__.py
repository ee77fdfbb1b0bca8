"""Corpus readers for the formats users bring, and :func:`open_image_corpus` to pick one.

Every reader yields records cheaply (``records()``) and decoded samples (``samples()``), skips
bad items into ``reader.report``, and raises :class:`~model.data.records.CorpusError` up front
for a corpus it cannot read at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from model.data.readers.base import BadItemError, CorpusReader, ImageReader, load_image
from model.data.readers.csv_reader import CsvImageReader, GroupedCsv
from model.data.readers.folder import FolderImageReader
from model.data.readers.karpathy import KarpathyImageReader
from model.data.readers.video_csv import VideoCsvReader
from model.data.readers.webdataset import WebDatasetImageReader, expand_braces, is_shard_pattern
from model.data.records import CorpusError

__all__ = [
    "BadItemError",
    "CorpusReader",
    "CsvImageReader",
    "FolderImageReader",
    "GroupedCsv",
    "ImageReader",
    "KarpathyImageReader",
    "VideoCsvReader",
    "WebDatasetImageReader",
    "expand_braces",
    "is_shard_directory",
    "load_image",
    "open_image_corpus",
]

ACCEPTED_FORMS = (
    "a .csv or .tsv file (filepath,caption columns), a Karpathy-split .json file, a .tar "
    "WebDataset shard, a shard pattern such as shards/{000..009}.tar, a directory of .tar "
    "shards, or a directory of images with same-named .txt captions"
)


def is_shard_directory(path: Path) -> bool:
    """Whether ``path`` is a folder of WebDataset ``.tar`` shards (and nothing else)."""
    if not path.is_dir():
        return False
    # Hidden entries (.DS_Store, .ipynb_checkpoints) do not make a shard directory a folder.
    entries = [entry for entry in path.iterdir() if not entry.name.startswith(".")]
    return bool(entries) and all(e.is_file() and e.suffix.lower() == ".tar" for e in entries)


def open_image_corpus(path: str | Path, **options: Any) -> ImageReader:
    """Return the image reader for ``path``, chosen by what ``path`` is.

    ``options`` go to the reader's constructor (``split=`` and ``captions_required=`` are
    accepted by every reader). A ``.tsv`` file gets ``separator="\\t"`` unless ``separator``
    is given.
    """
    text = str(path)
    if is_shard_pattern(text):
        return WebDatasetImageReader(text, **options)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return CsvImageReader(path, **options)
    if suffix == ".tsv":
        return CsvImageReader(path, **{"separator": "\t", **options})
    if suffix == ".json":
        return KarpathyImageReader(path, **options)
    if suffix == ".tar":
        return WebDatasetImageReader(path, **options)
    if path.is_dir():
        if is_shard_directory(path):
            return WebDatasetImageReader(path, **options)
        return FolderImageReader(path, **options)
    what = "does not exist" if not path.exists() else "is not a corpus this reader knows"
    raise CorpusError(f"{path} {what}; accepted: {ACCEPTED_FORMS}")
