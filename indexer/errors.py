"""The indexer's exception types, under one base: :class:`IndexerError`.

Callers catch the base (the service's collection registry treats any of them as "this
collection cannot load") or one kind; every message says what is wrong and with which file.
The runtime's own errors (``runtime.errors``: a bundle or an input that cannot be used) are
not indexer errors: they pass through unchanged.
"""

from wire import errors as wire_errors
from wire.errors import first_problem

__all__ = [
    "CollectionError",
    "FactoryError",
    "FilterError",
    "IndexFileError",
    "IndexerError",
    "JobError",
    "MetadataStoreError",
    "NoSuchJobError",
    "first_problem",
]


class IndexerError(Exception):
    """Base of every error the indexer raises on purpose."""


class CollectionError(IndexerError):
    """A collection or index bundle cannot be used: missing, built by another model, damaged."""


class IndexFileError(IndexerError):
    """An index file cannot be read: corrupt, truncated, or not built for inner product."""


class MetadataStoreError(IndexerError):
    """A metadata store cannot be used: missing, not ours, wrong version, opened read-only."""


class FactoryError(IndexerError, ValueError):
    """A FAISS factory string FAISS cannot build at this dimension (a user's choice, so also a
    ValueError: a click option or a pydantic field that checks one reports it as bad input)."""


class FilterError(IndexerError, wire_errors.FilterError):
    """A filter that cannot be read or run: over a limit, a bad field name, a value of the wrong
    type, text that is not ``FIELD=VALUE``. The filter came from the user; the message says which
    part is wrong. (A ValueError too, so that pydantic validators may raise it; a subclass of
    ``wire.errors.FilterError``, which the filter model and its text parser raise.)"""


class JobError(IndexerError):
    """A re-indexing or compaction job cannot be queued or looked up: Redis unreachable, ..."""


class NoSuchJobError(JobError):
    """No job with that id is known (never queued, or its record expired)."""
