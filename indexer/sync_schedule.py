"""Folders kept in sync by ``cots worker``: a sync job queued for each at start and then every
``--sync-every`` seconds, unless one of that collection is still queued or running (a slow
sync is never stacked behind itself).

``--sync /data/photos=photos --sync /data/videos=videos:video`` or, as one variable,
``COTS_SYNC_FOLDERS=/data/photos=photos,/data/videos=videos:video``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

from indexer.errors import JobError
from indexer.jobs import SyncRequest, enqueue_sync, pending_sync
from indexer.versions import current_version

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncTarget:
    folder: Path
    collection: str
    kind: Literal["image", "video"] = "image"


class SyncTargetType(click.ParamType):
    """``FOLDER=COLLECTION[:KIND]``; a variable holds several, comma-separated."""

    name = "FOLDER=COLLECTION[:KIND]"
    envvar_list_splitter = ","

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> SyncTarget:
        if isinstance(value, SyncTarget):
            return value
        folder, sep, rest = str(value).strip().rpartition("=")
        collection, _, kind = rest.partition(":")
        if not sep or not folder or not collection or kind not in ("", "image", "video"):
            self.fail(
                f"{value!r} is not FOLDER=COLLECTION or FOLDER=COLLECTION:KIND (KIND image or "
                "video), e.g. /data/photos=photos",
                param,
                ctx,
            )
        return SyncTarget(Path(folder), collection, "video" if kind == "video" else "image")


def queue_syncs(
    redis_url: str, root: Path, targets: tuple[SyncTarget, ...], bundle: Path | None
) -> list[str]:
    """Queue a sync of each target that has none queued or running; returns the job ids."""
    queued = []
    for target in targets:
        waiting = pending_sync(redis_url, target.collection)
        if waiting is not None:
            log.info("sync of %s still queued or running (job %s)", target.collection, waiting)
            continue
        request = SyncRequest(
            root=root,
            collection=target.collection,
            folder=target.folder,
            kind=target.kind,
            # Named for a first sync only: afterwards the bundle the collection records wins.
            bundle=bundle if current_version(root, target.collection) is None else None,
        )
        queued.append(enqueue_sync(redis_url, request))
    return queued


def start_schedule(
    redis_url: str,
    root: Path,
    targets: tuple[SyncTarget, ...],
    bundle: Path | None,
    every_s: float,
) -> threading.Event:
    """Queue the syncs every ``every_s`` seconds from a daemon thread (the first round is the
    caller's); set the returned event to stop it."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(every_s):
            try:
                queue_syncs(redis_url, root, targets, bundle)
            except (JobError, OSError) as error:  # Redis away: try again next round
                log.warning("could not queue the scheduled syncs: %s", error)

    threading.Thread(target=loop, name="cots-sync-schedule", daemon=True).start()
    return stop
