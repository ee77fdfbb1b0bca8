"""ASGI middleware: the body-size limit, per-route request metrics, and CORS for web apps on
other origins.

Pure ASGI (not ``BaseHTTPMiddleware``), so neither buffers a body nor costs a task per request.
"""

from __future__ import annotations

import json
import time
from typing import Final

from fastapi import HTTPException
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_body
from service.metrics import Metrics


async def _send_error(send: Send, status: int, message: str, *, vary_origin: bool = False) -> None:
    body = json.dumps(error_body(status, message)).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if vary_origin:
        headers.append((b"vary", b"Origin"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _TooLarge(HTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body parsing passes it on as
    it is rather than as a 400."""

    def __init__(self, message: str) -> None:
        super().__init__(413, message)


class BodyLimit:
    """413 for a body over ``max_bytes``: by its Content-Length at once, or, for a chunked
    body, as soon as the bytes received pass the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body over the limit of {self.max_bytes:,} bytes"
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_error(send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_bytes:
                    await _send_error(send, 413, message)
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            incoming = await receive()
            if incoming["type"] == "http.request":
                received += len(incoming.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge(message)
            return incoming

        async def tracking_send(outgoing: Message) -> None:
            nonlocal started
            if outgoing["type"] == "http.response.start":
                started = True
            await send(outgoing)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_error(send, 413, message)


class RequestMetrics:
    """Latency per route template (``/v1/collections/{name}/search``, not every name), method
    and status, and the count of POST requests in flight. Unmatched paths count as
    ``<unmatched>`` so scanners cannot grow the labels."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        counted = scope["method"] == "POST"
        if counted:
            self.metrics.in_flight += 1

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            if counted:
                self.metrics.in_flight -= 1
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.requests.labels(template, scope["method"], str(status)).observe(
                time.perf_counter() - start
            )


# What a cross-origin page may send and read. X-API-Key and Authorization carry keys (there
# are no cookies, so no credentials mode); a client reads Retry-After on 429 and 503,
# WWW-Authenticate on 401, and the ETag of a thumbnail. Add here any header clients read later.
CORS_METHODS: Final = ("GET", "POST", "DELETE", "OPTIONS")
CORS_REQUEST_HEADERS: Final = ("Content-Type", "X-API-Key", "Authorization")
CORS_EXPOSED_HEADERS: Final = ("Retry-After", "WWW-Authenticate", "ETag")


class AllowListCors(CORSMiddleware):
    """Starlette's CORS for the origins in ``cors_origins``, and nothing at all for others.

    Starlette still adds ``Access-Control-Expose-Headers`` for an origin it refuses, and
    answers its preflight with the allowed methods and headers; here a refused origin's
    request passes through untouched (but for ``Vary: Origin``, so a cache never hands its
    answer to an allowed origin) and its preflight is a 403 JSON error naming the origin.
    """

    def __init__(self, app: ASGIApp, origins: list[str]) -> None:
        super().__init__(
            app,
            allow_origins=origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
        )
        self.inner = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origin = Headers(scope=scope).get("origin") if scope["type"] == "http" else None
        if origin is None or self.is_allowed_origin(origin):
            await super().__call__(scope, receive, send)
            return
        if scope["method"] == "OPTIONS" and "access-control-request-method" in Headers(scope=scope):
            message = f"origin {origin[:200]!r} may not call this API (not in cors_origins)"
            await _send_error(send, 403, message, vary_origin=True)
            return

        async def varying_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).add_vary_header("Origin")
            await send(message)

        await self.inner(scope, receive, varying_send)
