"""Re-indexing jobs: a build queued in Redis (RQ) and run by ``cots worker``, or run in-process.

A job's only argument is the build's :class:`BuildSpec` as JSON, so what sits in Redis is the
same request a command line makes. The build itself is resumable (finished shards are kept) and
publishes a version only when it is complete, so a worker killed mid-build loses nothing but
the shard it was on: RQ hands the job back to the queue (``Retry``) once the dead worker's
heartbeat runs out, and the next attempt continues from the finished shards.

When a job succeeds it announces ``{"collection", "version", "bundle_id"}`` on
:data:`~indexer.redis_updates.UPDATES_CHANNEL`; every API replica listens there
(:func:`indexer.redis_updates.listen_for_updates`) and loads the new version.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field
from rq import Queue, Retry, get_current_job
from rq.exceptions import NoSuchJobError as UnknownRqJob
from rq.job import Job, JobStatus
from rq.worker.base import BaseWorker

from indexer.build_spec import BuildSpec
from indexer.compaction import CompactionPolicy, compact_collection
from indexer.duplicates import MIN_SCORE_FLOOR, duplicates_in
from indexer.errors import JobError, NoSuchJobError
from indexer.index_bundle import read_info
from indexer.redis_updates import UPDATES_CHANNEL, connect
from indexer.versions import current_dir
from runtime.bundle import read_manifest

if TYPE_CHECKING:
    from indexer.sync import SyncReport

log = logging.getLogger(__name__)

DEFAULT_QUEUE: Final = "cots-index"
# A build of a large corpus takes hours; the timeout only stops one that hangs for good.
JOB_TIMEOUT_S: Final = 24 * 3600
RESULT_TTL_S: Final = 7 * 24 * 3600  # keep finished and failed jobs a week, for `status`
RETRIES: Final = 2
_META_EVERY_S: Final = 0.5  # job.meta writes are throttled to this interval

Progress = Callable[[int, int, str], None]


def _enqueue(
    redis_url: str, work: Callable[[str], Any], argument: str, queue: str, what: str, **meta: Any
) -> str:
    """Queue ``work(argument)`` with the retries, timeouts and TTLs every index job gets."""
    connection = connect(redis_url)
    job = Queue(queue, connection=connection).enqueue(
        work,
        argument,
        job_timeout=JOB_TIMEOUT_S,
        result_ttl=RESULT_TTL_S,
        failure_ttl=RESULT_TTL_S,
        retry=Retry(max=RETRIES),
        description=what,
        meta={**meta, "stage": "queued"},
    )
    log.info("queued %s as job %s on %s", what, job.id, queue)
    return job.id


def enqueue_build(redis_url: str, spec: BuildSpec, *, queue: str = DEFAULT_QUEUE) -> str:
    """Queue a build of ``spec`` for ``cots worker``; returns the job id."""
    what = f"build collection {spec.collection} from {spec.corpus}"
    meta = {"collection": spec.collection, "done": 0, "total": 0}
    return _enqueue(redis_url, run_build_job, spec.model_dump_json(), queue, what, **meta)


class CompactionRequest(BaseModel):
    """A compaction job's only argument (as JSON in Redis)."""

    model_config = ConfigDict(extra="forbid")

    root: Path
    collection: str = Field(min_length=1)
    keep_versions: int = Field(3, ge=1)
    policy: CompactionPolicy = Field(default_factory=CompactionPolicy)


def enqueue_compaction(
    redis_url: str, request: CompactionRequest, *, queue: str = DEFAULT_QUEUE
) -> str:
    """Queue a compaction for ``cots worker``; returns the job id."""
    what = f"compact collection {request.collection}"
    return _enqueue(
        redis_url, run_compaction_job, request.model_dump_json(), queue, what,
        collection=request.collection,
    )  # fmt: skip


def run_compaction_inline(request: CompactionRequest) -> tuple[int, bool]:
    """(the live version after it, whether it published one)."""
    version = compact_collection(
        request.root,
        request.collection,
        keep_versions=request.keep_versions,
        policy=request.policy,
    )
    if version is None:
        live = current_dir(request.root, request.collection)
        return int(live.name), False
    return version, True


def run_compaction_job(request_json: str) -> dict[str, Any]:
    """The RQ job: compact, announce the new version (if one was published) on
    :data:`UPDATES_CHANNEL`; returns the announcement and whether anything was merged. Killed
    mid-way, it published nothing, and the retry does the same work again."""
    request = CompactionRequest.model_validate_json(request_json)
    job = get_current_job()
    if job is None:
        raise JobError("run_compaction_job runs inside an RQ worker; use compact_collection")
    version, compacted = run_compaction_inline(request)
    info = read_info(current_dir(request.root, request.collection))
    update = {
        "collection": request.collection,
        "version": version,
        "bundle_id": info.model_bundle_id,
    }
    if compacted:
        job.connection.publish(UPDATES_CHANNEL, json.dumps(update))
        log.info(
            "collection %s version %d (compacted) is live and announced",
            request.collection,
            version,
        )
    return {**update, "compacted": compacted}


class SyncRequest(BaseModel):
    """A sync job's only argument (as JSON in Redis): what ``indexer.sync.sync_collection``
    takes."""

    model_config = ConfigDict(extra="forbid")

    root: Path
    collection: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    folder: Path
    kind: Literal["image", "video"] = "image"
    bundle: Path | None = None  # None: the one the collection was built with
    workers: int = Field(2, ge=0)
    batch_size: int = Field(64, ge=1)
    keep_versions: int = Field(3, ge=1)


# collection -> the id of its latest queued sync, so a schedule does not queue a second one
# while the first waits or runs.
_SYNC_JOB_KEY: Final = "cots:sync-job:"
_PENDING: Final = frozenset(
    {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
)


def enqueue_sync(redis_url: str, request: SyncRequest, *, queue: str = DEFAULT_QUEUE) -> str:
    """Queue a sync for ``cots worker``; returns the job id."""
    what = f"sync collection {request.collection} with {request.folder}"
    meta = {"collection": request.collection, "kind": "sync", "done": 0, "total": 0}
    job_id = _enqueue(redis_url, run_sync_job, request.model_dump_json(), queue, what, **meta)
    with connect(redis_url) as client:
        client.set(_SYNC_JOB_KEY + request.collection, job_id, ex=RESULT_TTL_S)
    return job_id


def pending_sync(redis_url: str, collection: str) -> str | None:
    """The id of a sync of ``collection`` that is queued or running, if there is one."""
    with connect(redis_url) as client:
        job_id = client.get(_SYNC_JOB_KEY + collection)
        if job_id is None:
            return None
        try:
            job = Job.fetch(job_id.decode(), connection=client)
        except UnknownRqJob:
            return None
        return job.id if job.get_status(refresh=False) in _PENDING else None


def run_sync_inline(request: SyncRequest, progress: Progress | None = None) -> SyncReport:
    """Sync in this process (deployments without Redis); returns what it did."""
    from indexer.sync import sync_collection  # imported on use, as the build is

    return sync_collection(
        request.root,
        request.collection,
        request.folder,
        kind=request.kind,
        bundle=request.bundle,
        progress=progress,
        workers=request.workers,
        batch_size=request.batch_size,
        keep_versions=request.keep_versions,
    )


def run_sync_job(request_json: str) -> dict[str, Any]:
    """The RQ job: sync, with progress in ``job.meta``; announce the new version when it
    published one. Returns the announcement, ``published`` and the report. Killed mid-way, it
    published nothing, and the retry reuses the shards it saved."""
    request = SyncRequest.model_validate_json(request_json)
    job = get_current_job()
    if job is None:
        raise JobError("run_sync_job runs inside an RQ worker; use run_sync_inline instead")
    report = run_sync_inline(request, progress=_MetaProgress(job))
    info = read_info(current_dir(request.root, request.collection))
    update = {
        "collection": request.collection,
        "version": report.version,
        "bundle_id": info.model_bundle_id,
    }
    if report.published:
        job.connection.publish(UPDATES_CHANNEL, json.dumps(update))
        log.info("%s; announced", report.summary())
    return {**update, "published": report.published, "report": report.model_dump(mode="json")}


class DuplicatesRequest(BaseModel):
    """A near-duplicates job's only argument (as JSON in Redis)."""

    model_config = ConfigDict(extra="forbid")

    root: Path
    collection: str = Field(min_length=1)
    min_score: float = Field(0.97, ge=MIN_SCORE_FLOOR, le=1.0)


def enqueue_duplicates(
    redis_url: str, request: DuplicatesRequest, *, queue: str = DEFAULT_QUEUE
) -> str:
    """Queue a near-duplicates search for ``cots worker``; returns the job id."""
    what = f"find near-duplicates in collection {request.collection}"
    return _enqueue(
        redis_url, run_duplicates_job, request.model_dump_json(), queue, what,
        collection=request.collection, kind="duplicates",
    )  # fmt: skip


def run_duplicates_inline(request: DuplicatesRequest) -> dict[str, Any]:
    """The groups (``indexer.duplicates.DuplicateReport`` as JSON): a read, nothing is
    published or announced."""
    report = duplicates_in(request.root, request.collection, request.min_score)
    return report.model_dump(mode="json")


def run_duplicates_job(request_json: str) -> dict[str, Any]:
    """The RQ job: :func:`run_duplicates_inline`; its return value is the job's result."""
    return run_duplicates_inline(DuplicatesRequest.model_validate_json(request_json))


class _MetaProgress:
    """A build progress callback that stores ``done/total/stage`` in the running job's meta,
    at most every ``_META_EVERY_S`` seconds, and always at a new stage or at the end."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.saved_at = 0.0
        self.stage = ""

    def __call__(self, done: int, total: int, stage: str) -> None:
        now = time.monotonic()
        if stage == self.stage and done < total and now - self.saved_at < _META_EVERY_S:
            return
        self.stage, self.saved_at = stage, now
        self.job.meta.update(
            done=done, total=total, stage=stage, updated=datetime.now(UTC).isoformat()
        )
        self.job.save_meta()


def run_build_job(spec_json: str) -> dict[str, Any]:
    """The RQ job: build the collection, record progress in ``job.meta``, announce the new
    version on :data:`UPDATES_CHANNEL`; returns the announcement."""
    spec = BuildSpec.model_validate_json(spec_json)
    job = get_current_job()
    if job is None:
        raise JobError("run_build_job runs inside an RQ worker; use run_build_inline instead")
    version = run_build_inline(spec, progress=_MetaProgress(job))
    update = {
        "collection": spec.collection,
        "version": version,
        "bundle_id": read_manifest(spec.bundle, verify=False).bundle_id,
    }
    # The version is live before anyone hears of it, so a replica that reloads on the message
    # always finds it.
    job.connection.publish(UPDATES_CHANNEL, json.dumps(update))
    log.info("collection %s version %d is live and announced", spec.collection, version)
    return update


# What an RQ worker's work() replaces with its own handlers (warm, then cold shutdown).
_WORKER_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signal_handlers_restored() -> Iterator[None]:
    """Put back the SIGINT and SIGTERM handlers on the way out, however the block ends.

    An RQ worker installs handlers that do not exit on the first signal and never removes
    them. Left in a longer-lived process (a test run, a server running a worker in a thread's
    stead), they make that process ignore a plain SIGTERM, and any child it forks inherits them:
    ``Pool.terminate`` then waits forever for a forked worker that will not end.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; a worker elsewhere sets none
        return
    saved = {number: signal.getsignal(number) for number in _WORKER_SIGNALS}
    try:
        yield
    finally:
        for number, handler in saved.items():
            # None: the handler was set outside Python; the default is the closest we can do.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)


def work_in_process(worker: BaseWorker, *, burst: bool, logging_level: str = "INFO") -> bool:
    """``worker.work(...)`` in this process, with this process's signal handlers restored
    afterwards; whether it ran at least one job."""
    with signal_handlers_restored():
        return bool(worker.work(burst=burst, logging_level=logging_level))


def run_build_inline(spec: BuildSpec, progress: Progress | None = None) -> int:
    """Build ``spec`` in this process (deployments without Redis); returns the new version."""
    # Imported here: the service imports this module to queue jobs and should not pay for the
    # build's dependencies until it runs one.
    from indexer.build import build_collection

    return build_collection(spec, progress=progress)


def job_status(redis_url: str, job_id: str) -> dict[str, Any]:
    """``{"id", "status", "progress", "result", "error", ...}`` of a queued build."""
    connection = connect(redis_url)
    try:
        job = Job.fetch(job_id, connection=connection)
    except UnknownRqJob:
        raise NoSuchJobError(
            f"no re-indexing job {job_id!r} in Redis (finished jobs are kept "
            f"{RESULT_TTL_S // 86400} days)"
        ) from None
    meta = job.meta
    status = job.get_status(refresh=False)
    # The latest attempt's outcome: a retried job shows its last error until it succeeds.
    latest = job.latest_result()
    kind = latest.type if latest is not None else None
    return {
        "id": job.id,
        "status": str(status.value if status is not None else "unknown"),
        "collection": meta.get("collection"),
        "kind": meta.get("kind"),
        "progress": {key: meta.get(key) for key in ("done", "total", "stage", "updated")},
        "result": latest.return_value if latest and kind == latest.Type.SUCCESSFUL else None,
        "error": latest.exc_string if latest and kind == latest.Type.FAILED else None,
        "retries_left": job.retries_left,
        "enqueued_at": _iso(job.enqueued_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at),
    }


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None
