"""When the clients send a request again: after a 429 or 503 (the server refused before doing
any work: the rate limiter, a full batch queue, a collection being swapped in) and after a
connection that never opened. Nothing else is retried: a timeout after the request left may
have been acted on, and a 4xx will not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import httpx

from cots.client.errors import ApiError, RateLimitedError, UnavailableError

RETRIED_ERRORS: Final = (RateLimitedError, UnavailableError)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; between them the server's ``Retry-After`` when it sent one,
    else ``backoff_s`` doubling. A wait longer than ``max_wait_s`` is not waited: the error
    is raised at once, with its ``retry_after``, for the caller to decide."""

    attempts: int = 4
    backoff_s: float = 0.5
    max_wait_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {self.attempts}")
        if self.backoff_s < 0 or self.max_wait_s < 0:
            raise ValueError("backoff_s and max_wait_s cannot be negative")

    def wait_s(self, attempt: int, error: ApiError | httpx.TransportError) -> float | None:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 1), or None
        when ``error`` is to be raised."""
        if attempt >= self.attempts:
            return None
        if isinstance(error, httpx.TransportError):
            if not isinstance(error, httpx.ConnectError):
                return None
            wait = self.backoff_s * 2 ** (attempt - 1)
        elif isinstance(error, RETRIED_ERRORS):
            wait = error.retry_after
            if wait is None:
                wait = self.backoff_s * 2 ** (attempt - 1)
        else:
            return None
        return wait if wait <= self.max_wait_s else None


NO_RETRY: Final = RetryPolicy(attempts=1)
