"""Keeping a replica on the live versions: the Redis announcement for speed, the version
pointers on disk for certainty (pub/sub keeps no backlog, so a message sent while Redis or this
replica was away is caught by the next poll)."""

from __future__ import annotations

import logging
import threading

from indexer.errors import JobError
from indexer.redis_updates import listen_for_updates
from service.registry import CollectionRegistry

log = logging.getLogger("cots.updates")


class VersionWatcher:
    def __init__(
        self, registry: CollectionRegistry, redis_url: str | None, *, poll_s: float
    ) -> None:
        self.registry = registry
        self.redis_url = redis_url
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cots-versions", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.redis_url is None:
                self._stop.wait(self.poll_s)
                self._refresh(None)
                continue
            try:
                listener = listen_for_updates(self.redis_url, idle_timeout=self.poll_s)
            except JobError as error:
                log.debug("no update subscription yet: %s", error)
                self._stop.wait(self.poll_s)
                self._refresh(None)
                continue
            with listener:
                self._refresh(None)  # whatever was announced while we were not subscribed
                while not self._stop.is_set():
                    try:
                        update = next(listener)
                    except StopIteration:  # a quiet poll interval
                        self._refresh(None)
                        continue
                    name = update.get("collection")
                    if isinstance(name, str):
                        log.info("announced: %s version %s", name, update.get("version"))
                        self._refresh(name)

    def _refresh(self, name: str | None) -> None:
        try:
            self.registry.refresh(name)
        except Exception:  # a watcher that dies would leave the replica on old versions
            log.exception("refreshing collections failed")
