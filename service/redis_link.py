"""The service's one Redis connection pool, and what happens when Redis goes away.

Redis is an accelerator here, never a dependency of search: every use goes through
:meth:`RedisLink.call`, which gives up after a short timeout, marks Redis down and skips it for
``retry_s`` seconds (so an outage costs one timeout now and then, not one per request). A
background ping notices when it is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from indexer.redis_updates import redact
from service.metrics import Metrics

log = logging.getLogger("cots.redis")

T = TypeVar("T")


class RedisLink:
    def __init__(
        self,
        url: str | None,
        metrics: Metrics,
        *,
        timeout_s: float = 0.25,
        retry_s: float = 2.0,
    ) -> None:
        self.url = url
        self.metrics = metrics
        self.retry_s = retry_s
        self.client: aioredis.Redis | None = None
        if url is not None:
            self.client = aioredis.Redis.from_url(
                url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
            )
        self._down_until = 0.0
        self.up = False
        self._task: asyncio.Task[None] | None = None

    @property
    def configured(self) -> bool:
        return self.client is not None

    @property
    def state(self) -> str:
        if self.client is None:
            return "disabled"
        return "ok" if self.up else "down"

    async def start(self) -> None:
        if self.client is None:
            self.metrics.redis_up.set(0)
            return
        await self.ping()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="redis-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.client is not None:
            await self.client.aclose()

    async def ping(self) -> bool:
        ok = await self.call(lambda client: client.ping(), force=True) is not None
        return ok

    async def call(
        self, use: Callable[[aioredis.Redis], Awaitable[T]], *, force: bool = False
    ) -> T | None:
        """``use(client)``'s result, or None when Redis is unconfigured, down or fails."""
        if self.client is None or (not force and time.monotonic() < self._down_until):
            return None
        try:
            result = await use(self.client)
        except (RedisError, OSError, TimeoutError) as error:
            self._mark(False, error)
            return None
        self._mark(True)
        return result

    def _mark(self, up: bool, error: BaseException | None = None) -> None:
        if up and not self.up:
            log.info("Redis at %s is reachable", redact(self.url or ""))
        if not up:
            self._down_until = time.monotonic() + self.retry_s
            if self.up:
                log.warning(
                    "Redis at %s is down (%s); serving without it", redact(self.url or ""), error
                )
        self.up = up
        self.metrics.redis_up.set(1 if up else 0)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.retry_s)
            await self.ping()
