"""Errors at the API edge: the one table from error type to HTTP status, and handlers that
turn every failure into ``{"error": {"status", "code", "message"}}`` JSON, never a trace.

``service.errors`` (the service's own), ``indexer.errors.FilterError`` (a filter the client
sent) and pydantic's validation errors are the client's or the moment's: they get the status
:data:`STATUS` names for their class (the nearest in their MRO). Anything else is an internal
failure: logged with its trace and answered 500, never blamed on the client as a 4xx.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from indexer.errors import FilterError
from service.errors import (
    ForbiddenError,
    InputTooLargeError,
    InvalidInputError,
    MalformedInputError,
    NotFoundError,
    RateLimitedError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
    UnsupportedMediaError,
)

log = logging.getLogger("cots.service")

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


STATUS: Final[dict[type[Exception], int]] = {
    MalformedInputError: 400,
    UnauthenticatedError: 401,
    ForbiddenError: 403,
    NotFoundError: 404,
    InputTooLargeError: 413,
    UnsupportedMediaError: 415,
    InvalidInputError: 422,
    FilterError: 422,
    RateLimitedError: 429,
    UnavailableError: 503,
}


def status_of(error: Exception) -> int:
    """The status :data:`STATUS` gives ``error``'s class or its nearest base; 500 if none."""
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def headers_of(error: Exception) -> dict[str, str]:
    headers = {}
    if isinstance(error, UnauthenticatedError):
        headers["WWW-Authenticate"] = "ApiKey"
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return headers


def expected_error_response(error: ServiceError | FilterError) -> JSONResponse:
    """The response to an error the service raised on purpose (or a bad filter)."""
    message = error.message if isinstance(error, ServiceError) else str(error)
    return error_response(status_of(error), message, headers_of(error))


def error_body(status: int, message: str, details: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {
        "status": status,
        "code": _CODES.get(status, "error"),
        "message": message,
    }
    if details is not None:
        error["details"] = details
    return {"error": error}


def error_response(
    status: int, message: str, headers: Mapping[str, str] | None = None, details: Any = None
) -> JSONResponse:
    """The JSON error response every handler (and the search fast path) answers with."""
    return JSONResponse(error_body(status, message, details), status_code=status, headers=headers)


def validation_message(errors: Sequence[Any], within: str = "") -> tuple[str, list[dict[str, Any]]]:
    """(``field: what`` of the first problem pydantic found, and how many more; every
    problem as ``{"field", "message"}``). ``within`` names the field the errors are inside."""
    details = []
    for error in errors:
        parts = [within, *(str(part) for part in error.get("loc", ()) if part != "body")]
        where = ".".join(part for part in parts if part)
        details.append({"field": where or "body", "message": error.get("msg", "invalid")})
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{first['field']}: {first['message']}{more}", details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> JSONResponse:
        return expected_error_response(error)

    @app.exception_handler(FilterError)
    async def filter_error(request: Request, error: FilterError) -> JSONResponse:
        return expected_error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, details = validation_message(error.errors())
        return error_response(422, message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else "request failed"
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs"
        elif error.status_code == 405:
            headers = {k.lower(): v for k, v in (error.headers or {}).items()}
            allowed = headers.get("allow", "")
            message = f"{request.method} is not allowed on {request.url.path} (allowed: {allowed})"
        return error_response(error.status_code, message, getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal error; the server log has the details")
