"""``cots worker``: run queued re-indexing jobs (see :mod:`indexer.jobs`) from Redis."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import click
from rq import Worker

from indexer.cli import _root_option
from indexer.errors import JobError
from indexer.jobs import DEFAULT_QUEUE, work_in_process
from indexer.redis_updates import connect, redact
from indexer.sync_schedule import SyncTarget, SyncTargetType, queue_syncs, start_schedule

# RQ looks for jobs whose worker died (no heartbeat for ~90 s) when it runs its maintenance; its
# default of every 10 minutes would leave a killed build waiting that long to be retried.
MAINTENANCE_INTERVAL_S = 60


@click.command()
@click.option(
    "--redis-url",
    envvar="COTS_REDIS_URL",
    show_envvar=True,
    required=True,
    help="Redis holding the job queue, e.g. redis://localhost:6379/0.",
)
@click.option("--queue", default=DEFAULT_QUEUE, show_default=True, help="Queue to take jobs from.")
@click.option("--burst", is_flag=True, help="Exit once the queue is empty instead of waiting.")
@click.option("--name", default=None, help="Worker name (default: host and process id).")
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
)
@click.option(
    "--sync",
    "sync_targets",
    type=SyncTargetType(),
    multiple=True,
    envvar="COTS_SYNC_FOLDERS",
    show_envvar=True,
    help="Keep a collection in sync with a folder (repeatable), e.g. /data/photos=photos or "
    "/data/videos=videos:video; the variable holds several, comma-separated.",
)
@click.option(
    "--sync-every",
    type=click.FloatRange(min=0),
    default=0,
    envvar="COTS_SYNC_EVERY",
    show_envvar=True,
    help="Queue the --sync folders' syncs every SECONDS (0: once, at start).",
)
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="COTS_BUNDLE",
    help="Model bundle for a --sync collection's first sync (later ones use the recorded one).",
)
@_root_option
def worker(
    redis_url: str,
    queue: str,
    burst: bool,
    name: str | None,
    log_level: str,
    sync_targets: tuple[SyncTarget, ...],
    sync_every: float,
    bundle: Path | None,
    root: Path,
) -> None:
    """Run re-indexing jobs queued in Redis, one at a time, each in a forked process.

    A job killed with its worker is handed back to the queue once RQ notices the worker is gone
    (about 90 s) and continues from its finished shards; it is retried at most twice. With
    --sync, it also queues syncs of those folders at start and every --sync-every seconds.
    """
    level = log_level.upper()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `cots -v` may already have configured logging more verbosely: keep whichever is lower.
    top = logging.getLogger()
    top.setLevel(min(top.level, logging.getLevelNamesMapping()[level]))
    try:
        connection = connect(redis_url)
    except JobError as error:
        raise click.ClickException(str(error)) from None
    rq_worker = Worker(
        [queue],
        connection=connection,
        name=name or f"cots-{socket.gethostname()}-{os.getpid()}",
        maintenance_interval=MAINTENANCE_INTERVAL_S,
    )
    logging.getLogger(__name__).info(
        "worker %s on %s, queue %s%s",
        rq_worker.name,
        redact(redis_url),
        queue,
        " (burst)" if burst else "",
    )
    schedule = None
    if sync_targets:
        try:
            queue_syncs(redis_url, root, sync_targets, bundle)
        except JobError as error:
            raise click.ClickException(str(error)) from None
        if sync_every > 0 and not burst:
            schedule = start_schedule(redis_url, root, sync_targets, bundle, sync_every)
    try:
        # Restored afterwards: `cots worker` may run inside another program (a test, a runner).
        work_in_process(rq_worker, burst=burst, logging_level=level)
    finally:
        if schedule is not None:
            schedule.set()
