"""Errors at the API edge: one exception type with a status, and handlers that turn every
failure into ``{"error": {"status", "code", "message"}}`` JSON, never a stack trace."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


class ApiError(Exception):
    """A request that cannot be answered: ``status`` and a message that says why."""

    def __init__(
        self, status: int, message: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class OverloadedError(ApiError):
    """The batch queue is full: come back in ``retry_after`` seconds."""

    def __init__(self, stage: str, retry_after: int = 1) -> None:
        super().__init__(
            503,
            f"the server is busy ({stage} queue full); retry after {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


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


def _validation_message(errors: list[Any]) -> tuple[str, list[dict[str, Any]]]:
    details = []
    for error in errors:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        details.append({"field": where or "body", "message": error.get("msg", "invalid")})
    first = details[0] if details else {"field": "body", "message": "invalid request"}
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{first['field']}: {first['message']}{more}", details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        message, details = _validation_message(list(error.errors()))
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
