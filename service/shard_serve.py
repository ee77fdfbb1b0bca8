"""One shard of a sharded collection, served by a Ray Serve deployment.

``service.shard_router`` -- handle call --> ``<collection>-shard-<i>`` (R replicas, one per
node) -> :class:`ShardReplica` -> the shard's collection (``indexer.sharded``: a normal
collection under the sharded collection's ``shards/`` root) -> (scores, ids) or items

A replica holds its shard through a :class:`~service.registry.CollectionRegistry` of its own,
the one that swaps versions in the front door: a new version is opened beside the served one
(sharing its segments) and swapped in with one assignment, so a query never fails because a
version changed. The replica polls the shard's ``current`` pointer every ``poll_s`` seconds;
a call that names a newer version than the one served (the router read it from disk) loads it
first, so an answer never comes from a version older than the one the router knows of.

Every call returns the version it was answered from. Errors in the query itself (a filter the
store refuses, a wrong dimension) reach the router as they are; a shard that cannot load its
collection fails its constructor and health check, and Serve replaces the replica.

Files are read from the path the router names: every Ray node must see the index root at the
same path (a shared volume), as every ``cots serve`` replica does.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Final

import faiss
import numpy as np
import ray
from ray import serve

from indexer.collection import Collection
from indexer.filters import as_filter
from indexer.metadata import Item
from indexer.sharded import shard_name, shard_root
from service.errors import UnavailableError
from service.metrics import Metrics
from service.registry import CollectionRegistry

log = logging.getLogger("cots.shards")

# A replica answers one call per thread; FAISS's own OpenMP pool across every core of the node
# would make R replicas of S shards fight over the same cores.
FAISS_THREADS: Final = 1


class ShardLoadError(UnavailableError):
    """The replica has no version of its shard it can serve (the router counts the shard as
    missing; a 503 where it reaches a client)."""


class ShardReplica:
    """One replica of shard ``shard`` of ``collection`` (under the index root ``root``)."""

    def __init__(
        self,
        root: str,
        collection: str,
        shard: int,
        bundle_id: str,
        *,
        poll_s: float,
        mmap: bool = True,
        rescore: int | None = None,
    ) -> None:
        faiss.omp_set_num_threads(FAISS_THREADS)
        self.collection = collection
        self.shard = shard
        self.name = shard_name(shard)
        self.registry = CollectionRegistry(
            shard_root(Path(root), collection),
            bundle_id,
            Metrics(),  # its own registry of metrics: the front door reports for the shards
            names=[self.name],
            use_gpu=False,
            mmap=mmap,
            rescore=rescore,
        )
        self.registry.refresh()
        self._served()  # no version to serve: fail here, and Serve tries another replica
        self._stop = threading.Event()
        self._poller = threading.Thread(
            target=self._poll, args=(poll_s,), name=f"poll-{collection}-{self.name}", daemon=True
        )
        self._poller.start()
        log.info("%s shard %d: serving version %d", collection, shard, self._served().version)

    def _poll(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                self.registry.refresh()
            except Exception:  # the next poll tries again; the served version keeps serving
                log.exception("%s shard %d: reload failed", self.collection, self.shard)

    def _served(self) -> Collection:
        served = self.registry.get(self.name)
        if served is None:
            why = self.registry.errors.get(self.name, "not loaded")
            raise ShardLoadError(f"shard {self.shard} of collection {self.collection!r}: {why}")
        return served

    def _at_least(self, version: int) -> Collection:
        """The served version, once it is at least ``version`` (loaded now if the poll has
        not yet; a version that fails to load leaves the served one answering)."""
        served = self._served()
        if served.version < version:
            self.registry.refresh(only=self.name)
            served = self._served()
        return served

    def check_health(self) -> None:
        """Serve's health check: a replica with nothing to serve is replaced."""
        self._served()

    def nearest(
        self,
        queries: np.ndarray,
        k: int,
        filters_json: str,
        rescore: int | None,
        with_items: bool,
        version: int,
    ) -> tuple[np.ndarray, np.ndarray, dict[int, Item] | None, int]:
        """(scores [Q, k], ids [Q, k] with -1 padding, the ids' items when ``with_items``,
        version answered from)."""
        served = self._at_least(version)
        filters = as_filter(json.loads(filters_json)) if filters_json else None
        scores, ids = served.nearest(queries, k, filters=filters, rescore=rescore)
        items = None
        if with_items:
            found = np.unique(ids[ids >= 0])
            items = {int(i): item for i, item in zip(found, served.get(found), strict=True) if item}
        return scores, ids, items, served.version

    def items(self, ids: np.ndarray, version: int) -> tuple[dict[int, Item], int]:
        """The live items among ``ids`` (unknown and removed ones left out)."""
        served = self._at_least(version)
        found = served.get(ids)
        return {int(i): item for i, item in zip(ids, found, strict=True) if item}, served.version

    def stored_vectors(self, ids: np.ndarray, version: int) -> tuple[dict[int, np.ndarray], int]:
        served = self._at_least(version)
        return served.stored_vectors(ids), served.version

    def ids_matching(self, filters_json: str, version: int) -> tuple[np.ndarray, int]:
        served = self._at_least(version)
        filters = as_filter(json.loads(filters_json)) if filters_json else None
        return served.ids_matching(filters), served.version

    def describe(self, version: int) -> dict[str, Any]:
        """Where this replica runs and what it serves (for operators and tests)."""
        served = self._served()
        return {
            "shard": self.shard,
            "version": served.version,
            "live": served.info.live,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        registry = getattr(self, "registry", None)
        if registry is not None:
            registry.close()


# The deployment: options (name, replicas, placement) are set per shard by the router.
ShardDeployment = serve.deployment(ShardReplica)
