"""What the client raises: one base, and one class per answer a caller handles differently.

Every non-2xx answer becomes an ``ApiError`` subclass chosen by its status, carrying the
server's own ``{"error": {"status", "code", "message", "details"}}`` (service/errors.py) and,
for 429 and 503, the ``Retry-After`` it sent.
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from wire.schemas import JobInfo


class ClientError(Exception):
    """Anything the COTS Search client raises."""


class ConnectionFailedError(ClientError):
    """The server could not be reached (refused, unresolvable, timed out)."""


class ApiError(ClientError):
    """The server answered with an error status."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.retry_after = retry_after


class BadRequestError(ApiError):
    """400: unusable input (bad base64, an undecodable image, a body that is not JSON)."""


class UnauthorizedError(ApiError):
    """401: a key is needed, or the one sent is not valid."""


class ForbiddenError(ApiError):
    """403: the key lacks the scope, or the server does not do this."""


class NotFoundError(ApiError):
    """404: no such collection, item, job or route."""


class PayloadTooLargeError(ApiError):
    """413: the body or an image is larger than the server accepts."""


class UnsupportedMediaTypeError(ApiError):
    """415: not an accepted image format."""


class InvalidRequestError(ApiError):
    """422: a field or limit is wrong; ``details`` lists the fields."""


class RateLimitedError(ApiError):
    """429: too many requests; ``retry_after`` says when to come back."""


class UnavailableError(ApiError):
    """503: busy, or the collection or Redis is unavailable."""


class ServerError(ApiError):
    """5xx other than 503: a failure on the server's side."""


class JobFailedError(ClientError):
    """A job ended without finishing; ``job`` holds its status and error."""

    def __init__(self, job: JobInfo) -> None:
        super().__init__(f"job {job.id} {job.status}: {job.error or 'no error recorded'}")
        self.job = job


class JobTimeoutError(ClientError):
    """A job was still running when the wait gave up; ``job`` is its last status."""

    def __init__(self, job: JobInfo, waited_s: float) -> None:
        super().__init__(f"job {job.id} still {job.status} after {waited_s:.0f} s")
        self.job = job


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequestError,
    401: UnauthorizedError,
    403: ForbiddenError,
    404: NotFoundError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: InvalidRequestError,
    429: RateLimitedError,
    503: UnavailableError,
}


def retry_after_s(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds: the server sends whole seconds; an HTTP date (a proxy's)
    is read too."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def error_from(response: httpx.Response) -> ApiError:
    """The typed error for an error answer, with the server's message when it sent one (a
    proxy's HTML error page gets its status line instead)."""
    status = response.status_code
    code, message, details = "error", f"{status} {response.reason_phrase}", None
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        code = str(error.get("code", code))
        message = str(error.get("message", message))
        details = error.get("details") if isinstance(error.get("details"), list) else None
    elif response.text:
        message = f"{message}: {response.text[:300]}"
    kind = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return kind(status, code, message, details=details, retry_after=retry_after_s(response))
