"""Redis for the indexer: one way to connect (with a clear error), and the channel on which
a finished change announces its new version to every API replica.

A job that publishes a version sends ``{"collection", "version", "bundle_id"}`` on
:data:`UPDATES_CHANNEL` (``indexer.jobs``); each replica holds an :class:`UpdateListener`
(``service.updates``) and loads the new version when the message arrives. Pub/sub keeps no
backlog, so a replica that reconnects rereads the ``current`` pointers as well.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import redis

from indexer.errors import JobError

log = logging.getLogger("indexer.jobs")

UPDATES_CHANNEL: Final = "cots:index-updates"


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(redis_url: str) -> redis.Redis:
    """A client for ``redis_url`` that has answered PING; :class:`JobError` says why not."""
    try:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
        client.ping()
    except ValueError as error:  # a malformed URL
        raise JobError(f"invalid Redis URL {redact(redis_url)!r}: {error}") from None
    except redis.RedisError as error:
        raise JobError(
            f"cannot reach Redis at {redact(redis_url)}: {str(error).rstrip('.')}. "
            "Start Redis, or point --redis-url / COTS_REDIS_URL at a running one."
        ) from None
    return client


class UpdateListener:
    """An iterator over the announcements on :data:`UPDATES_CHANNEL`; subscribed from the moment
    it is created, so nothing published after that is missed. Close it (or use ``with``)."""

    def __init__(self, redis_url: str, *, idle_timeout: float | None = None) -> None:
        self.idle_timeout = idle_timeout
        self.client = connect(redis_url)
        self.pubsub = self.client.pubsub()
        self.pubsub.subscribe(UPDATES_CHANNEL)
        # Wait for Redis to confirm: a message published before then would not reach us.
        confirmation = self.pubsub.get_message(timeout=5)
        if confirmation is None or confirmation.get("type") != "subscribe":
            self.close()
            raise JobError(f"Redis did not confirm the subscription to {UPDATES_CHANNEL}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        """The next announcement; StopIteration after ``idle_timeout`` seconds without one."""
        waited_since = time.monotonic()
        backoff = 1.0
        while True:
            if self.idle_timeout is not None:
                left = self.idle_timeout - (time.monotonic() - waited_since)
                if left <= 0:
                    raise StopIteration
                wait = min(left, 1.0)
            else:
                wait = 1.0
            try:
                message = self.pubsub.get_message(timeout=wait)
            except (redis.ConnectionError, redis.TimeoutError) as error:
                # redis-py reconnects and subscribes again on the next call; back off between
                # tries so a Redis outage is neither a busy loop nor a flood of warnings.
                log.warning("lost the Redis subscription (%s); retrying in %.0f s", error, backoff)
                time.sleep(backoff)
                backoff = min(2 * backoff, 5.0)
                continue
            backoff = 1.0
            if message is None or message.get("type") != "message":
                continue
            try:
                update = json.loads(message["data"])
            except (TypeError, ValueError):
                log.warning("ignoring a malformed message on %s: %r", UPDATES_CHANNEL, message)
                continue
            if isinstance(update, dict):
                return update
            log.warning("ignoring a non-object message on %s: %r", UPDATES_CHANNEL, update)

    def close(self) -> None:
        self.pubsub.close()
        self.client.close()

    def __enter__(self) -> UpdateListener:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def listen_for_updates(redis_url: str, *, idle_timeout: float | None = None) -> UpdateListener:
    """Subscribe to new-version announcements (for API replicas): iterate the result for
    ``{"collection", "version", "bundle_id"}`` dicts. A replica that reconnects after Redis was
    down should also reread each collection's ``current`` version: pub/sub keeps no backlog."""
    return UpdateListener(redis_url, idle_timeout=idle_timeout)
