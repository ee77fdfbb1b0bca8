"""API keys and per-key rate limits.

Keys are stored as SHA-256 digests in settings, never in clear. A key goes in the ``X-API-Key``
header (or ``Authorization: Bearer``). Writes need scope ``write``, re-index jobs ``admin``;
search is open unless ``search_requires_key``, but a key that is sent must be valid.

The rate limit is a fixed window (a minute unless ``rate_limit_window_s``) per key (anonymous
callers: per client address), counted in Redis so every replica shares it, or in process when
Redis is absent or down.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.requests import Request

from service.errors import ForbiddenError, RateLimitedError, UnauthenticatedError
from service.redis_link import RedisLink
from service.settings import ApiKey, Scope, Settings


@dataclass(frozen=True)
class Caller:
    name: str  # the key's name, or "anonymous:<address>"
    scopes: frozenset[str]
    authenticated: bool


def presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def identify(request: Request, keys: list[ApiKey]) -> Caller:
    """Who is calling; 401 for a key that matches none (a wrong key is never anonymous)."""
    key = presented_key(request)
    if key is None:
        address = request.client.host if request.client else "unknown"
        return Caller(f"anonymous:{address}", frozenset({"search"}), authenticated=False)
    digest = ApiKey.hash(key)
    for known in keys:
        if hmac.compare_digest(digest, known.sha256):
            return Caller(known.name, frozenset(known.scopes) | {"search"}, authenticated=True)
    raise UnauthenticatedError("invalid API key")


def authorise(caller: Caller, scope: Scope, settings: Settings) -> None:
    if scope == "search" and not settings.search_requires_key:
        return
    if not caller.authenticated:
        hint = "" if settings.api_keys else " (this server has no keys: set COTS_API_KEYS)"
        raise UnauthenticatedError(
            f"this request needs an API key with scope {scope!r} in the X-API-Key header{hint}",
        )
    if scope not in caller.scopes:
        raise ForbiddenError(f"API key {caller.name!r} lacks scope {scope!r}")


class RateLimiter:
    def __init__(self, link: RedisLink, per_window: int, window_s: int = 60) -> None:
        self.link = link
        self.per_window = per_window
        self.window_s = window_s
        self._local: dict[str, tuple[int, int]] = {}  # caller -> (window, count)

    async def check(self, caller: Caller) -> None:
        if self.per_window == 0:
            return
        now = time.time()
        window = int(now // self.window_s)
        count = await self._count_redis(caller.name, window)
        if count is None:
            count = self._count_local(caller.name, window)
        if count > self.per_window:
            retry = max(1, int((window + 1) * self.window_s - now) + 1)
            per = "minute" if self.window_s == 60 else f"{self.window_s} s"
            raise RateLimitedError(
                f"rate limit of {self.per_window} requests per {per} reached for "
                f"{caller.name}; retry in {retry} s",
                retry_after=retry,
            )

    async def _count_redis(self, name: str, window: int) -> int | None:
        key = f"cots:rate:{name}:{window}"

        async def incr(client: aioredis.Redis) -> int:
            pipe = client.pipeline()
            pipe.incr(key)
            pipe.expire(key, self.window_s * 2)
            count, _ = await pipe.execute()
            return int(count)

        return await self.link.call(incr)

    def _count_local(self, name: str, window: int) -> int:
        seen_window, count = self._local.get(name, (window, 0))
        count = count + 1 if seen_window == window else 1
        if len(self._local) > 100_000:  # forget old callers rather than grow without end
            self._local = {k: v for k, v in self._local.items() if v[0] == window}
        self._local[name] = (window, count)
        return count
