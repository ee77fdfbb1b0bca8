"""The collections a replica serves, each at its live version, swapped without a restart.

A new version is opened beside the old one and swapped in with one assignment, so a search
never waits for a load and never sees half of a version. The old version stays open for
``grace_s`` seconds, long enough for searches that already hold it to finish, then is closed.

Versions are opened memory-mapped by default (``mmap``): the segments' index data, ids and
stored vectors stay in the page cache, shared by every replica on the host, and a swap maps
the new segments instead of reading them. Lossy segments rescore ``rescore`` candidates per
result with their stored vectors (``indexer.rescore``).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Protocol

from indexer.collection import Collection
from indexer.errors import IndexerError
from indexer.sharded import is_sharded
from indexer.versions import CURRENT, current_version
from runtime.errors import BundleRuntimeError
from service.metrics import Metrics


class ShardedOpener(Protocol):
    """Opens sharded collections (``service.shard_router.RayShards``): ``previous`` itself
    when its shards' versions are unchanged."""

    def open(self, root: Path, name: str, previous: Collection | None) -> Collection: ...


log = logging.getLogger("cots.registry")


class CollectionRegistry:
    def __init__(
        self,
        root: Path,
        bundle_id: str,
        metrics: Metrics,
        *,
        names: list[str] | None = None,
        use_gpu: bool | None = None,
        grace_s: float = 30.0,
        retry_failed_s: float = 60.0,
        mmap: bool = True,
        rescore: int | None = None,
        shards: ShardedOpener | None = None,
    ) -> None:
        self.root = Path(root)
        self.bundle_id = bundle_id
        self.metrics = metrics
        self.fixed_names = list(names or [])
        self.use_gpu = use_gpu
        self.mmap = mmap
        self.rescore = rescore  # None: indexer.segments.default_rescore by segment size
        # Sharded collections' link to Ray Serve (service.shard_router); None: not served.
        self.shards = shards
        self.grace_s = grace_s
        self.retry_failed_s = retry_failed_s
        # collection -> (version that failed to load, when): a damaged version is tried again
        # after retry_failed_s, not on every poll (each try re-hashes its files and logs).
        self._failed: dict[str, tuple[int, float]] = {}
        self._live: dict[str, Collection] = {}
        self.errors: dict[str, str] = {}  # collection -> why it is not served
        self._retired: list[tuple[float, Collection]] = []
        self._lock = threading.Lock()  # one load at a time; readers never take it

    def names(self) -> list[str]:
        """Served collections (configured, or discovered under the root), sorted."""
        if self.fixed_names:
            return sorted(self.fixed_names)
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if (p / CURRENT).is_symlink() or is_sharded(self.root, p.name)
        )

    def get(self, name: str) -> Collection | None:
        return self._live.get(name)

    def loaded(self) -> dict[str, Collection]:
        return dict(self._live)

    def unavailable(self) -> dict[str, str]:
        """Collections not served at all, with the reason (a failed reload of a served one
        keeps its old version serving and is not listed)."""
        return {name: why for name, why in self.errors.items() if name not in self._live}

    def refresh(self, only: str | None = None) -> list[str]:
        """Load every collection whose live version differs from the one served; returns the
        names swapped. Safe to call from any thread, at any time."""
        swapped = []
        served = self.names()
        with self._lock:
            for name in served if only is None else [n for n in served if n == only]:
                if self._refresh_one(name):
                    swapped.append(name)
            self._close_retired()
            self.metrics.collections_unavailable.set(len(self.unavailable()))
        return swapped

    def _refresh_one(self, name: str) -> bool:
        if is_sharded(self.root, name):
            return self._refresh_sharded(name)
        try:
            version = current_version(self.root, name)
        except (OSError, ValueError) as error:
            self.errors[name] = f"cannot read its current version: {error}"
            return False
        served = self._live.get(name)
        if version is None:
            self.errors[name] = f"collection {name!r} has no live version under {self.root}"
            return False
        if served is not None and served.version == version:
            return False
        failed_version, failed_at = self._failed.get(name, (None, 0.0))
        if failed_version == version and time.monotonic() - failed_at < self.retry_failed_s:
            return False
        try:
            # Segments the served version holds are shared, not loaded again.
            opened = Collection.open(
                self.root,
                name,
                bundle_id=self.bundle_id,
                version=version,
                previous=served,
                use_gpu=self.use_gpu,
                mmap=self.mmap,
                rescore=self.rescore,
            )
        except (IndexerError, BundleRuntimeError, OSError) as error:
            self.errors[name] = str(error)
            self.metrics.reloads.labels(name, "failed").inc()
            self._failed[name] = (version, time.monotonic())
            log.error("cannot load collection %s version %s: %s", name, version, error)
            return False
        except Exception as error:
            # The fault boundary: whatever a damaged file makes a reader raise (sqlite3, numpy,
            # FAISS), one collection must not stop the replica serving the others.
            self.errors[name] = f"{type(error).__name__}: {error}"
            self.metrics.reloads.labels(name, "failed").inc()
            self._failed[name] = (version, time.monotonic())
            log.exception("cannot load collection %s version %s", name, version)
            return False
        self._live[name] = opened  # the swap: readers see the old or the new, whole
        self.errors.pop(name, None)
        self._failed.pop(name, None)
        self.metrics.index_version.labels(name).set(version)
        self.metrics.index_items.labels(name).set(opened.info.live)
        if served is not None:
            self._retired.append((time.monotonic(), served))
            self.metrics.reloads.labels(name, "loaded").inc()
            log.info(
                "collection %s: version %d -> %d (loaded %d of its %d segments)",
                name, served.version, version, len(opened.loaded), len(opened.info.segments),
            )  # fmt: skip
        else:
            log.info("collection %s: serving version %d", name, version)
        return True

    def _refresh_sharded(self, name: str) -> bool:
        """A collection split into shards, served by Ray Serve: its router is opened by
        ``service.shard_router`` (nothing of the shards is loaded here)."""
        if self.shards is None:
            self.errors[name] = (
                f"collection {name!r} is sharded, and its shards are served by a Ray cluster: "
                "set COTS_RAY_ADDRESS (or RAY_ADDRESS) to its address, e.g. ray://head:10001"
            )
            return False
        served = self._live.get(name)
        try:
            opened = self.shards.open(self.root, name, served)
        except Exception as error:  # the fault boundary: the other collections keep serving
            why = f"{type(error).__name__}: {error}"
            if self.errors.get(name) != why:  # logged once, not at every poll
                log.error("cannot serve sharded collection %s: %s", name, why)
            self.errors[name] = why
            return False
        if opened is served:
            return False
        self._live[name] = opened
        self.errors.pop(name, None)
        self.metrics.index_version.labels(name).set(opened.version)
        self.metrics.index_items.labels(name).set(opened.info.live)
        log.info("collection %s: serving version %d (sharded)", name, opened.version)
        return True

    def _close_retired(self, *, force: bool = False) -> None:
        now = time.monotonic()
        keep = []
        for retired_at, collection in self._retired:
            if force or now - retired_at >= self.grace_s:
                collection.close()
            else:
                keep.append((retired_at, collection))
        self._retired = keep

    def close(self) -> None:
        with self._lock:
            self._close_retired(force=True)
            for collection in self._live.values():
                collection.close()
            self._live.clear()
