"""``cots index sync``: make a collection equal to a folder, at the cost of what changed.

```
folder ── scan_media (stat only) ──► files: relpath, size, mtime_ns
live version ── items' metadata ────► held: relpath -> recorded size, mtime_ns, sha256, ids
        │
  plan_sync (indexer.sync_plan): unchanged (nothing opened) · touched (same bytes: re-added
        │   with the stored vector) · new and changed (to encode) · gone (ids removed)
        ▼
  encode new + changed in shards saved under <root>/<collection>/syncs/<key>/  (resumable)
        │
  accept: each encoded file stat'ed again; one that changed since the scan waits for the next
        │   sync, one that vanished is skipped as "missing file" (and its old items removed)
        ▼
  ONE version: a new segment (encoded + touched items) and the removed ids, via update.commit
  (or, for a collection that does not exist yet, the build's assembler: a first sync = a build)
```

New ids come from :func:`indexer.versions.reserve_numbers`, after the largest the collection
ever gave; a changed file gets new ids and its old ones (a video's segments too) join the
delete set. An unchanged folder publishes nothing. The shards' key is the bundle id and the
planned files' relpath, size and mtime, so a re-run after a crash reuses the shards saved (and
the ids reserved) for the same plan; the folder is deleted once the version is live. A failed
sync publishes nothing. One sync per collection at a time (an ``flock``, which dies with its
process).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydantic import BaseModel
from tqdm import tqdm

from indexer.assemble import assemble_version
from indexer.build import with_media_index_fields
from indexer.build_spec import BuildSpec
from indexer.collection import Collection
from indexer.errors import CollectionError
from indexer.faiss_choice import choose_factory
from indexer.index_bundle import SEGMENTS, IndexInfo, read_info
from indexer.item_ids import next_record_number
from indexer.media_records import no_media_message
from indexer.media_scan import MediaFile, MediaKind, MediaScan, MediaScanError, scan_media
from indexer.segments import index_fields, new_segment_id, write_segment
from indexer.shards import Progress, Shard, ShardEncoder, ShardPlan
from indexer.sync_plan import (
    Hasher,
    Held,
    SyncPlan,
    file_record,
    held_files,
    plan_sync,
)
from indexer.sync_rows import Rows, Touched, accept_encoded, re_add_touched
from indexer.update import commit, joined_segment
from indexer.versions import (
    collection_dir,
    current_version,
    reserve_numbers,
    staging,
    version_dir,
)
from runtime.bundle import BundleManifest, read_manifest
from runtime.encoder import Encoder

SYNCS: Final = "syncs"
_NUMBERS: Final = "numbers.json"


class SyncReport(BaseModel):
    """What a sync did. ``version`` is the live version after it (``published``: a new one)."""

    collection: str
    version: int
    published: bool
    added: int = 0  # new files now items
    changed: int = 0  # files re-encoded (their old items removed)
    touched: int = 0  # files with a new mtime but the same bytes: re-added, not re-encoded
    removed: int = 0  # files gone from the folder, their items removed
    unchanged: int = 0
    encoded: int = 0  # files encoded by this run
    resumed: int = 0  # files whose shards an interrupted run had saved
    hashed: int = 0  # files opened to compare their bytes (or record them)
    skipped: dict[str, int] = {}  # per reason: not media, missing file, changed during sync, ...
    seconds: float = 0.0

    def summary(self) -> str:
        """One line: ``photos: 5 new, 1 changed, 3 removed, 196 unchanged; encoded 6 files in
        2.1 s; now version 4``."""
        counts = [f"{self.added:,} new", f"{self.changed:,} changed"]
        if self.touched:
            counts.append(f"{self.touched:,} touched")
        counts += [f"{self.removed:,} removed", f"{self.unchanged:,} unchanged"]
        text = f"{self.collection}: {', '.join(counts)}; encoded {self.encoded:,} files"
        if self.resumed:
            text += f" (and {self.resumed:,} from the interrupted sync)"
        text += f" in {self.seconds:.1f} s"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{r}: {n:,}" for r, n in sorted(self.skipped.items()))
        if self.published:
            return f"{text}; now version {self.version}"
        return f"{text}; already in sync at version {self.version}"


def sync_collection(
    root: Path,
    collection: str,
    folder: Path,
    *,
    kind: MediaKind = "image",
    bundle: Path | None = None,
    progress: Progress | None = None,
    workers: int = 2,
    batch_size: int = 64,
    shard_size: int = 2048,
    keep_versions: int = 3,
) -> SyncReport:
    """Make ``collection`` hold exactly the ``kind`` files of ``folder`` (see the module
    docstring); ``bundle`` defaults to the one the collection was built with."""
    started = time.perf_counter()
    root, folder = Path(root), Path(folder)
    live = current_version(root, collection)
    info = read_info(version_dir(root, collection, live)) if live is not None else None
    spec = BuildSpec(
        collection=collection,
        root=root,
        bundle=_bundle(collection, info, bundle),
        corpus=str(folder),
        kind=kind,
        segment_seconds=(info.build.get("segment_seconds", 2.0) if info else 2.0),
        shard_size=shard_size,
        workers=workers,
        batch_size=batch_size,
        keep_versions=keep_versions,
    )
    manifest = read_manifest(spec.bundle, verify=False)
    if info is not None:
        _check_compatible(info, spec, manifest)
    try:
        scan = scan_media(folder, frozenset({kind}))
    except MediaScanError as error:
        raise CollectionError(str(error)) from None
    if progress is not None:
        progress(len(scan.files), len(scan.files), "scanning")
    if info is None and not scan.files:  # before the lock creates the collection's folder
        raise CollectionError(no_media_message(scan, kind))
    with _exclusive(root, collection):
        live = current_version(root, collection)  # another change may have published meanwhile
        info = read_info(version_dir(root, collection, live)) if live is not None else None
        if info is None:
            spec = with_media_index_fields(spec)  # a first sync is a build: the same fields
        report = _sync_locked(spec, manifest, info, scan, progress)
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _sync_locked(
    spec: BuildSpec,
    manifest: BundleManifest,
    info: IndexInfo | None,
    scan: MediaScan,
    progress: Progress | None,
) -> SyncReport:
    hasher = Hasher()
    held, plan, touched = _compare(spec, info, scan, hasher)
    floor = next_record_number(spec.kind, info.max_id if info is not None else -1)
    key = sync_key(manifest, spec, plan.encode)
    work = collection_dir(spec.root, spec.collection) / SYNCS / key
    shards: list[Shard] = []
    encoded = resumed = 0
    if plan.encode:  # an unchanged folder writes nothing, not even an empty work folder
        first = _numbers(spec, work, len(plan.encode), floor)
        shards, encoded, resumed = _encode(spec, plan.encode, scan.captions, first, work, progress)
    rows = Rows()
    skipped = Counter(scan.skipped)
    added, changed = accept_encoded(plan, held, shards, hasher, rows, skipped)
    re_add_touched(spec, touched, rows, floor)
    skipped.update(plan.skipped)
    report = SyncReport(
        collection=spec.collection,
        version=current_version(spec.root, spec.collection) or 0,
        published=False,
        added=added,
        changed=changed,
        touched=len(touched),
        removed=len(plan.gone),
        unchanged=plan.unchanged,
        encoded=encoded,
        resumed=resumed,
        hashed=hasher.files,
        skipped=dict(skipped),
    )
    doomed = np.union1d(plan.removed_ids(), np.asarray(rows.replaced, dtype=np.int64))
    if rows.ids or len(doomed) or info is None:
        report.version = _publish(spec, manifest, info, rows, doomed, dict(skipped), progress)
        report.published = True
    shutil.rmtree(work.parent, ignore_errors=True)
    return report


def _compare(
    spec: BuildSpec, info: IndexInfo | None, scan: MediaScan, hasher: Hasher
) -> tuple[dict[str, Held], SyncPlan, list[Touched]]:
    """What the live version holds of the folder, the plan, and the touched files' vectors
    (read while the segments are open)."""
    folder = Path(spec.corpus)
    if info is None:
        return {}, plan_sync(folder, scan.files, {}, hasher), []
    live = current_version(spec.root, spec.collection)
    with Collection.open(spec.root, spec.collection, version=live, with_indexes=False) as now:
        held, _ = held_files(now)
        if not scan.files and held:
            raise CollectionError(
                f"{folder} holds no {spec.kind} files now, but collection {spec.collection!r} "
                f"holds {len(held):,} of its files: refusing to remove them all (is the folder "
                "mounted?); remove them with cots index remove"
            )
        plan = plan_sync(folder, scan.files, held, hasher)
        touched = [
            (
                file,
                sha256,
                [(item, segment.lookup(np.array([item.id]))[0]) for item, segment in known.items],
            )
            for file, known, sha256 in plan.touched
        ]
    return held, plan, touched


def _bundle(collection: str, info: IndexInfo | None, bundle: Path | None) -> Path:
    if bundle is not None:
        return Path(bundle)
    if info is None:
        raise CollectionError(
            f"collection {collection!r} does not exist yet: name the model bundle to build it "
            "with (--bundle DIR)"
        )
    recorded = info.model_bundle_path
    if recorded is None or not Path(recorded).is_dir():
        where = (
            "does not record its model bundle"
            if recorded is None
            else f"was built with {recorded}, which is gone"
        )
        raise CollectionError(
            f"collection {collection!r} {where}: name the bundle it was built with "
            f"(model bundle {info.model_bundle_id[:12]}) with --bundle DIR"
        )
    return Path(recorded)


def _check_compatible(info: IndexInfo, spec: BuildSpec, manifest: BundleManifest) -> None:
    name = spec.collection
    if info.kind != spec.kind:
        raise CollectionError(
            f"collection {name!r} holds {info.kind} items, not {spec.kind}: sync it with "
            f"--kind {info.kind}"
        )
    if info.model_bundle_id != manifest.bundle_id:
        raise CollectionError(
            f"collection {name!r} was built with model bundle {info.model_bundle_id[:12]}; "
            f"{spec.bundle} is {manifest.short_id}: sync with --bundle naming the bundle it was "
            "built with, or rebuild it with cots index build"
        )
    if info.format_version < 2:
        raise CollectionError(
            f"collection {name!r} is in index format 1 (written before segments); run "
            f"`cots index compact --collection {name}` once, then sync"
        )


@contextmanager
def _exclusive(root: Path, collection: str) -> Iterator[None]:
    """One sync per collection: two would encode the same files and publish them twice."""
    folder = collection_dir(root, collection)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".sync.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CollectionError(
                f"a sync of collection {collection!r} is already running (lock {lock.name}); "
                "wait for it to finish"
            ) from None
        yield


def sync_key(manifest: BundleManifest, spec: BuildSpec, files: Sequence[MediaFile]) -> str:
    """What decides a sync's shards: the same key means a re-run may reuse them."""
    digest = hashlib.sha256()
    fields = {
        "bundle": manifest.bundle_id,
        **spec.model_dump(mode="json", include={"kind", "segment_seconds", "shard_size"}),
    }
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for file in files:
        digest.update(f"\n{file.relpath}\0{file.size}\0{file.mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _numbers(spec: BuildSpec, work: Path, count: int, floor: int) -> int:
    """The first record number of the files to encode: the one an interrupted run of the same
    plan reserved (its shards hold those ids), else a fresh reservation."""
    path = work / _NUMBERS
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("count") == count and int(saved.get("first", -1)) >= floor:
            return int(saved["first"])
        # Another change published ids above them since (or the collection was rebuilt):
        # only a range above every id given is certainly free, so encode again.
        shutil.rmtree(work)
    # Other plans' shards are stale: the folder changed since they were encoded.
    if work.parent.is_dir():
        shutil.rmtree(work.parent)
    work.mkdir(parents=True)
    first = reserve_numbers(spec.root, spec.collection, count, floor)
    tmp = path.with_name(_NUMBERS + ".tmp")
    tmp.write_text(json.dumps({"first": first, "count": count}), encoding="utf-8")
    os.replace(tmp, path)
    return first


def _encode(
    spec: BuildSpec,
    files: list[MediaFile],
    captions: dict[str, Path],
    first: int,
    work: Path,
    progress: Progress | None,
) -> tuple[list[Shard], int, int]:
    """Every shard of the plan (encoding those not saved yet); (shards, files encoded now,
    files taken from saved shards)."""
    numbered = [
        (first + i, file_record(file, captions.get(file.relpath))) for i, file in enumerate(files)
    ]
    plan = ShardPlan.scan(spec, len(numbered), work)
    done = plan.done
    if progress is not None:
        progress(done, plan.total, "encoding")
    if plan.pending:
        encoder = Encoder(spec.bundle, batch_size=spec.batch_size)
        bar = tqdm(total=plan.total, initial=done, desc=f"syncing {spec.collection}", unit="file")
        with bar, ShardEncoder(spec, encoder) as shards:
            for index in plan.pending:
                start, end = plan.bounds(index)
                shards.encode(numbered[start:end], bar).save(plan.paths[index])
                done += end - start
                if progress is not None:
                    progress(done, plan.total, "encoding")
    loaded = [Shard.load(path) for path in plan.paths]
    fresh = {item.uri for i in plan.pending for item in loaded[i].items}
    return loaded, len(fresh), plan.done


def _publish(
    spec: BuildSpec,
    manifest: BundleManifest,
    info: IndexInfo | None,
    rows: Rows,
    doomed: np.ndarray,
    skipped: dict[str, int],
    progress: Progress | None,
) -> int:
    ids, vectors, items = rows.arrays(manifest.embed_dim)
    if progress is not None:
        progress(len(ids), len(ids), "publishing")
    if info is None:  # a first sync is a build of the files
        return assemble_version(spec, manifest, [Shard(ids, vectors, items, [])], skipped, progress)
    with staging(spec.root, spec.collection) as staged:
        written = None
        if len(ids):
            factory = choose_factory(len(ids), manifest.embed_dim)
            segment = staged / SEGMENTS / new_segment_id()
            written = write_segment(segment, ids, vectors, items, factory, index_fields(info.build))

        def rebase(now: IndexInfo, deleted: np.ndarray) -> tuple[IndexInfo, np.ndarray]:
            # What this sync left out is the folder's state now, not a running total.
            update: dict[str, Any] = {"skipped": skipped}
            if written is not None:
                update |= joined_segment(now, written)
            return now.model_copy(update=update), np.union1d(deleted, doomed)

        return commit(spec.root, spec.collection, staged, spec.keep_versions, rebase)
