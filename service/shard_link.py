"""The front door's link to the Ray cluster that serves sharded collections' shards.

``ShardLink.handles(root, name)`` -> (joined once: ``ray.init`` in a thread, waited for
CONNECT_WAIT_S at most) -> each shard's Serve application ``<collection>-shard-<i>`` deployed
where none runs (``service.shard_serve``: R replicas, at most one per node) -> one
``DeploymentHandle`` per shard, kept for the life of the process.

A deployment already running (started by another front door, or by the cluster's own config,
``service.shard_app``) is used as it is: Serve application names are cluster-wide, so one Ray
cluster serves one index root's sharded collections (or collections of distinct names). A
thread reads Serve's status every STATUS_POLL_S (replicas running per deployment), which
``service.shard_router`` uses not to wait for shards that have none; shard outages are logged
once per change, not once per query.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from indexer.sharded import ShardedInfo
from service.errors import UnavailableError

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

log = logging.getLogger("cots.shards")

# Each replica's CPU reservation, for placement only: small, so that S x R replicas fit a few
# cores; a replica searches with one FAISS thread per call (service.shard_serve).
REPLICA_CPUS: Final = 0.1
# Calls one replica runs at once (the engine already batches queries into one call per shard).
REPLICA_MAX_ONGOING: Final = 8
# How long a replica being stopped may finish its calls (Serve's default, 20 s, is for long
# requests; a shard call takes milliseconds).
REPLICA_SHUTDOWN_S: Final = 5.0
RAY_VARIABLE: Final = "RAY_ADDRESS"
# How often Serve's status (replicas running per deployment) is read.
STATUS_POLL_S: Final = 1.0
# How long one refresh waits to join the Ray cluster before reporting the collection
# unavailable for now (the joining goes on).
CONNECT_WAIT_S: Final = 10.0

Placement = Callable[[str, int], dict[str, Any]]


def ray_address(configured: str | None) -> str | None:
    """The Ray cluster of sharded collections: COTS_RAY_ADDRESS, else RAY_ADDRESS, else none."""
    return configured or os.environ.get(RAY_VARIABLE) or None


def deployment_name(collection: str, shard: int) -> str:
    """The Serve application and deployment of one shard."""
    return f"{collection}-shard-{shard}"


class ShardLink:
    """The front door's link to the Ray cluster that serves its sharded collections' shards
    (:class:`service.shard_router.RayShards` adds opening them)."""

    def __init__(
        self,
        address: str,
        *,
        bundle_id: str,
        timeout_s: float,
        poll_s: float,
        mmap: bool = True,
        rescore: int | None = None,
        placement: Placement | None = None,
    ) -> None:
        """``placement(collection, shard)``: Ray actor options merged into each replica's,
        e.g. ``{"resources": {"shard-host": 0.01}}`` to keep replicas on the nodes that have
        that resource (default: any node with a little CPU, one replica of a shard per node)."""
        self.address = address
        self.bundle_id = bundle_id
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.mmap = mmap
        self.rescore = rescore
        self.placement = placement
        self._handles: dict[tuple[str, str], list[DeploymentHandle]] = {}
        self._down: set[tuple[str, int]] = set()  # (collection, shard) last seen without answer
        self._lock = threading.Lock()
        self._deploying = threading.Lock()
        self._connecting = threading.Lock()
        self._connector: threading.Thread | None = None
        self._connect_error: Exception | None = None
        self._running: dict[str, int] = {}  # deployment -> replicas Serve runs (its status)
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None
        # Shard calls made from an event loop's thread (similar_to's stored vector) wait here:
        # a blocking Serve call refuses to run inside a running loop.
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="shards")

    def connect(self) -> None:
        """Join the Ray cluster (once per process; a process already in one stays there).

        ``ray.init`` waits minutes for a cluster that does not answer, so it runs in a thread
        of its own and is waited for CONNECT_WAIT_S at most: the start-up and the registry's
        polls go on, and the collection is unavailable (naming the address) until it joins."""
        import ray

        if ray.is_initialized():
            return
        with self._connecting:
            if self._connector is None:
                log.info(
                    "connecting to the Ray cluster at %s for sharded collections", self.address
                )
                self._connect_error = None
                self._connector = threading.Thread(
                    target=self._join, name="ray-connect", daemon=True
                )
                self._connector.start()
            self._connector.join(CONNECT_WAIT_S)
            if ray.is_initialized():
                return
            if self._connector.is_alive():
                raise UnavailableError(
                    f"the Ray cluster at {self.address} that serves the shards has not "
                    f"answered yet (still trying)"
                )
            self._connector = None  # the next call tries again
            raise UnavailableError(
                f"cannot join the Ray cluster at {self.address} that serves the shards: "
                f"{self._connect_error}"
            )

    def _join(self) -> None:
        import ray

        try:
            ray.init(address=self.address, log_to_driver=False)
        except Exception as error:
            self._connect_error = error

    def handles(self, root: Path, name: str, sharded: ShardedInfo) -> list[DeploymentHandle]:
        """Handles to the shards' deployments, deployed first where none is running."""
        key = (str(Path(root).resolve()), name)
        with self._deploying:  # not self._lock: queries note shards under it meanwhile
            found = self._handles.get(key)
            if found is None or len(found) != sharded.shards:
                found = self._handles[key] = self._deploy(Path(key[0]), name, sharded)
            return found

    def _deploy(self, root: Path, name: str, sharded: ShardedInfo) -> list[DeploymentHandle]:
        self.connect()
        from ray import serve

        from service.shard_serve import ShardDeployment

        serve.start(proxy_location="Disabled")  # handles only; joins a running Serve as it is
        running = serve.status().applications
        targets = []
        for i in range(sharded.shards):
            app = deployment_name(name, i)
            if app in running:
                continue
            deployment = ShardDeployment.options(  # type: ignore[attr-defined]
                name=app,
                num_replicas=sharded.replicas,
                max_replicas_per_node=1,  # a node's death takes one replica of a shard at most
                ray_actor_options={
                    "num_cpus": REPLICA_CPUS,
                    **(self.placement(name, i) if self.placement else {}),
                },
                max_ongoing_requests=REPLICA_MAX_ONGOING,
                graceful_shutdown_timeout_s=REPLICA_SHUTDOWN_S,
            )
            bound = deployment.bind(
                str(root),
                name,
                i,
                self.bundle_id,
                poll_s=self.poll_s,
                mmap=self.mmap,
                rescore=self.rescore,
            )
            targets.append(serve.RunTarget(bound, name=app, route_prefix=None))
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch_replicas, name="serve-status", daemon=True
            )
            self._watcher.start()
        if targets:
            log.info(
                "deploying %d shard(s) of collection %s (%d replicas each) on Ray Serve",
                len(targets), name, sharded.replicas,
            )  # fmt: skip
            # Not waiting for the replicas: a shard that cannot be placed yet (fewer nodes than
            # replicas) leaves the collection partial, not the service unstarted.
            serve.run_many(targets, wait_for_applications_running=False)
        return [
            serve.get_deployment_handle(deployment_name(name, i), deployment_name(name, i))
            for i in range(sharded.shards)
        ]

    def note(self, name: str, shard: int, *, answered: bool, why: str = "") -> None:
        """Log a shard going down or coming back (once per change, not once per query)."""
        key = (name, shard)
        with self._lock:
            if answered == (key not in self._down):
                return
            if answered:
                self._down.discard(key)
            else:
                self._down.add(key)
        if answered:
            log.info("collection %s: shard %d answers again", name, shard)
        else:
            log.warning("collection %s: shard %d did not answer (%s)", name, shard, why)

    def is_away(self, collection: str, shard: int) -> bool:
        """Whether the shard missed its last call and Serve last said it runs no replica of
        it (a shard still starting, never missed, is not away)."""
        with self._lock:
            missed = (collection, shard) in self._down
        return missed and self._running.get(deployment_name(collection, shard), 1) == 0

    def _watch_replicas(self) -> None:
        """Every STATUS_POLL_S, how many replicas Serve runs of each deployment."""
        import ray
        from ray import serve

        while not self._closed.is_set():
            if ray.is_initialized():  # shut down: serve.status() would join Ray again
                self._read_status(serve)
            self._closed.wait(STATUS_POLL_S)

    def _read_status(self, serve: Any) -> None:
        try:
            applications = serve.status().applications
        except Exception as error:  # the next poll tries again; the last counts stay
            log.debug("cannot read Serve's status: %s", error)
        else:
            self._running = {
                name: sum(
                    count for state, count in status.replica_states.items() if state == "RUNNING"
                )
                for app in applications.values()
                for name, status in app.deployments.items()
            }

    def close(self) -> None:
        self._closed.set()
        self.pool.shutdown(wait=False)
