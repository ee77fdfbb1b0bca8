"""The service's exception types, under one base: :class:`ServiceError`.

Each says what is wrong in the service's own terms (a malformed input, a missing collection,
an overloaded queue), never an HTTP status: the API layer maps every error type to its status
in one table (``service.api.errors.STATUS``), so the engine, the batchers and the job runner
can be used without HTTP (the demo does). An error that is none of these, nor one of the
packages' errors that the table names, is an internal failure: a 500 with a logged trace.
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error the service raises on purpose; ``message`` is for the client."""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Seconds after which the same request may succeed (a full queue, a rate limit).
        self.retry_after = retry_after


class MalformedInputError(ServiceError):
    """Input that cannot be read at all: not base64, not JSON, not a usable file name, an
    image that does not decode, a URL that cannot be fetched."""


class InvalidInputError(ServiceError):
    """Input that reads but cannot be used: an empty text, a k over the limit, an embedding
    of the wrong size, a field that contradicts the collection."""


class InputTooLargeError(ServiceError):
    """An input over a size limit (bytes or pixels)."""


class UnsupportedMediaError(ServiceError):
    """An input in a format the service does not take."""


class UnauthenticatedError(ServiceError):
    """No API key, or one that matches none, where a key is needed."""


class ForbiddenError(ServiceError):
    """The caller is known but may not do this: a scope it lacks, a path outside the data
    root, a URL host outside the allow-list."""


class NotFoundError(ServiceError):
    """No such collection, item or job."""


class RateLimitedError(ServiceError):
    """The caller sent more requests than its rate allows; ``retry_after`` says when to."""


class UnavailableError(ServiceError):
    """The service cannot answer this now (starting, a collection that did not load, Redis
    unreachable for a job); ``retry_after`` where waiting helps."""


class OverloadedError(UnavailableError):
    """The batch queue is full: come back in ``retry_after`` seconds."""

    def __init__(self, stage: str, retry_after: int = 1) -> None:
        super().__init__(
            f"the server is busy ({stage} queue full); retry after {retry_after} s",
            retry_after=retry_after,
        )
