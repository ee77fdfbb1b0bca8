"""Jobs that change collections: add items, remove items, re-index.

Re-index jobs go to the Redis queue (``cots worker`` runs them, and announces the new version
to every replica) when Redis is configured; otherwise they run here, in process, as adds and
removes always do. A job run here makes this replica load the result at once and, when Redis is
up, announces it to the other replicas too. Jobs run one at a time per replica: they write
versions of collections, and each takes the collection's lock anyway.

With Redis, the status of a job run here is also written there (``cots:local-job:<id>``, kept
as long as queued jobs' results), so any replica or worker process can answer ``GET
/v1/jobs/{id}``: behind a load balancer, or with ``cots serve --workers N``, the poll for a job
rarely reaches the process that runs it.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any, Literal

from indexer.build_spec import BuildSpec
from indexer.errors import JobError, NoSuchJobError
from indexer.jobs import (
    RESULT_TTL_S,
    CompactionRequest,
    DuplicatesRequest,
    SyncRequest,
    enqueue_build,
    enqueue_compaction,
    enqueue_duplicates,
    enqueue_sync,
    job_status,
    run_build_inline,
    run_compaction_inline,
    run_duplicates_inline,
    run_sync_inline,
)
from indexer.redis_updates import UPDATES_CHANNEL, connect
from service.errors import NotFoundError, UnavailableError
from service.registry import CollectionRegistry
from service.schemas import JobInfo

log = logging.getLogger("cots.jobs")

JobKind = Literal["add", "remove", "reindex", "compact", "sync", "duplicates"]
_KEEP_FINISHED = 1000
_SHARED_KEY = "cots:local-job:"


class JobRunner:
    def __init__(self, registry: CollectionRegistry, redis_url: str | None) -> None:
        self.registry = registry
        self.redis_url = redis_url
        self._jobs: dict[str, JobInfo] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cots-job")
        # Status writes to Redis, in order, off the event loop (an add is accepted in an async
        # route, and a Redis that does not answer takes its 5 s connect timeout) and off the
        # job thread (a queued job's status must be readable before the job ahead ends).
        self._sharing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cots-job-share")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._sharing.shutdown(wait=False)

    def reindex(self, spec: BuildSpec) -> JobInfo:
        if self.redis_url is None:
            return self.run_here("reindex", spec.collection, lambda: run_build_inline(spec))
        try:
            job_id = enqueue_build(self.redis_url, spec)
        except JobError as error:
            raise UnavailableError(f"cannot queue the re-index job: {error}") from None
        return JobInfo(id=job_id, status="queued", kind="reindex", collection=spec.collection)

    def compact(self, request: CompactionRequest) -> JobInfo:
        def work() -> tuple[int, dict[str, bool]]:
            version, compacted = run_compaction_inline(request)
            return version, {"compacted": compacted}

        return self._queued_or_here(
            "compact", request.collection, enqueue_compaction, request, work
        )

    def sync(self, request: SyncRequest) -> JobInfo:
        """A sync of a collection with a folder: queued when there is Redis, else run here."""

        def work() -> tuple[int, dict[str, Any]]:
            report = run_sync_inline(request)
            return report.version, report.model_dump(mode="json")

        return self._queued_or_here("sync", request.collection, enqueue_sync, request, work)

    def duplicates(self, request: DuplicatesRequest) -> JobInfo:
        """Near-duplicate groups as a job (a read: its result is the groups, no version)."""
        work = partial(run_duplicates_inline, request)
        return self._queued_or_here(
            "duplicates", request.collection, enqueue_duplicates, request, work, publishes=False
        )

    def _queued_or_here(
        self,
        kind: JobKind,
        collection: str,
        enqueue: Callable[[str, Any], str],
        request: Any,
        work: Callable[[], Any],
        *,
        publishes: bool = True,
    ) -> JobInfo:
        """``request`` on the Redis queue when there is one (``enqueue``), else ``work`` run in
        this process (:meth:`run_here`)."""
        if self.redis_url is None:
            return self.run_here(kind, collection, work, publishes=publishes)
        try:
            job_id = enqueue(self.redis_url, request)
        except JobError as error:
            noun = "compaction" if kind == "compact" else kind
            raise UnavailableError(f"cannot queue the {noun} job: {error}") from None
        return JobInfo(id=job_id, status="queued", kind=kind, collection=collection)

    def run_here(
        self, kind: JobKind, collection: str, work: Callable[[], Any], *, publishes: bool = True
    ) -> JobInfo:
        """Run ``work`` (which returns the new version, or (version, detail)) in this process;
        ``publishes=False``: ``work`` only reads, and what it returns is the job's result."""
        job = JobInfo(
            id=f"local-{uuid.uuid4().hex}", status="queued", kind=kind, collection=collection
        )
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
        self._share(job)
        self._executor.submit(self._run, job.id, collection, work, publishes)
        return job.model_copy()

    def _run(
        self, job_id: str, collection: str, work: Callable[[], Any], publishes: bool = True
    ) -> None:
        self._update(job_id, status="started", progress={"started": _now()})
        try:
            outcome = work()
        except Exception as error:  # the job's failure is its status, not the server's
            log.exception("job %s on %s failed", job_id, collection)
            self._update(job_id, status="failed", error=f"{type(error).__name__}: {error}")
            return
        if not publishes:
            self._update(job_id, status="finished", result=outcome, progress={"ended": _now()})
            return
        version, detail = outcome if isinstance(outcome, tuple) else (outcome, None)
        self.registry.refresh(collection)
        self._announce(collection, version)
        result = {"version": version, **({"detail": detail} if detail is not None else {})}
        self._update(job_id, status="finished", result=result, progress={"ended": _now()})

    def _announce(self, collection: str, version: int) -> None:
        if self.redis_url is None:
            return
        message = {
            "collection": collection,
            "version": version,
            "bundle_id": self.registry.bundle_id,
        }
        try:
            with connect(self.redis_url) as client:
                client.publish(UPDATES_CHANNEL, json.dumps(message))
        except Exception as error:  # the others find it by polling the version pointer
            log.warning("could not announce %s version %d: %s", collection, version, error)

    def _update(self, job_id: str, **changes: Any) -> None:
        with self._lock:
            job = self._jobs[job_id]
            if "progress" in changes:
                changes["progress"] = {**job.progress, **changes["progress"]}
            job = self._jobs[job_id] = job.model_copy(update=changes)
        self._share(job)

    def _share(self, job: JobInfo) -> None:
        """Have ``job`` written to Redis for the other processes (on the sharing thread)."""
        if self.redis_url is not None:
            self._sharing.submit(self._write_shared, self.redis_url, job)

    @staticmethod
    def _write_shared(redis_url: str, job: JobInfo) -> None:
        # A Redis that is down costs only this: the process still answers for its own jobs.
        try:
            with connect(redis_url) as client:
                client.set(_SHARED_KEY + job.id, job.model_dump_json(), ex=RESULT_TTL_S)
        except Exception as error:
            log.warning("could not share the status of job %s: %s", job.id, error)

    def _shared(self, job_id: str) -> JobInfo | None:
        if self.redis_url is None:
            return None
        try:
            with connect(self.redis_url) as client:
                found = client.get(_SHARED_KEY + job_id)
        except JobError as error:
            raise UnavailableError(f"cannot look job {job_id!r} up: {error}") from None
        return None if found is None else JobInfo.model_validate_json(found)

    def _forget_old(self) -> None:
        done = [key for key, job in self._jobs.items() if job.status in ("finished", "failed")]
        for key in done[: max(0, len(self._jobs) - _KEEP_FINISHED)]:
            del self._jobs[key]

    def status(self, job_id: str) -> JobInfo:
        with self._lock:
            if job_id in self._jobs:
                return self._jobs[job_id].model_copy()
        if job_id.startswith("local-"):
            shared = self._shared(job_id)
            if shared is None:
                raise NotFoundError(f"no job {job_id!r} on this server")
            return shared
        if self.redis_url is None:
            raise NotFoundError(f"no job {job_id!r} on this server")
        try:
            found = job_status(self.redis_url, job_id)
        except NoSuchJobError as error:
            raise NotFoundError(str(error)) from None
        except JobError as error:
            raise UnavailableError(str(error)) from None
        return JobInfo(
            id=found["id"],
            status=found["status"],
            kind=found.get("kind") or "reindex",
            collection=found.get("collection"),
            progress={k: v for k, v in found["progress"].items() if v is not None},
            result=found.get("result"),
            error=found.get("error"),
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
