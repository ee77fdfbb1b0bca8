"""A Python client for a COTS Search server (``cots serve``), sync and async, on httpx.

    from cots.client import Client

    with Client("http://localhost:8000", api_key="...") as client:
        page = client.search("images", "a small red circle", k=5, filters={"split": "test"})
        for hit in page.hits:
            print(hit.score, hit.uri)
        job = client.wait(client.add_images("images", ["photo.png"], ["a red circle"]))

Results are the API's pydantic models (``wire.schemas``, the service's own); errors are the
classes of ``cots.client.errors``, each carrying the server's status, code and message. A 429
or 503 is retried after the server's ``Retry-After`` (``RetryPolicy``). ``cots search`` is the
same client on the command line.
"""

from cots.client.aio import AsyncClient
from cots.client.calls import new_image_item
from cots.client.errors import (
    ApiError,
    BadRequestError,
    ClientError,
    ConnectionFailedError,
    ForbiddenError,
    InvalidRequestError,
    JobFailedError,
    JobTimeoutError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
    ServerError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedMediaTypeError,
)
from cots.client.retrying import NO_RETRY, RetryPolicy
from cots.client.sync import Client

__all__ = [
    "NO_RETRY",
    "ApiError",
    "AsyncClient",
    "BadRequestError",
    "Client",
    "ClientError",
    "ConnectionFailedError",
    "ForbiddenError",
    "InvalidRequestError",
    "JobFailedError",
    "JobTimeoutError",
    "NotFoundError",
    "PayloadTooLargeError",
    "RateLimitedError",
    "RetryPolicy",
    "ServerError",
    "UnauthorizedError",
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "new_image_item",
]
