"""``cots index sync`` of a sharded collection: one plan over every shard's items, applied
per shard.

``folder -> scan -> held files of all shards (merged by path) -> plan_sync -> encode new and
changed (resumable, under <root>/<name>/syncs/) -> accept -> per shard: one version with the
new items it owns and the removed ids it holds (indexer.sharded_update)``

The steps are ``indexer.sync``'s (its scan, plan, encoding, resumption and acceptance, the
same lock and the same id reservation at the collection's own folder, which adds use too);
only the held files come from every shard and the publish goes to each. A video's items may
sit in several shards (ids route one by one), so a file's held items are gathered from all
of them before the plan compares it.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np

from indexer.build_spec import BuildSpec
from indexer.errors import CollectionError
from indexer.item_ids import next_record_number
from indexer.media_scan import MediaKind, MediaScanError, scan_media
from indexer.sharded import LocalShards, read_sharded
from indexer.sharded_update import add_sharded_encoded, shard_infos
from indexer.shards import Progress, Shard
from indexer.sync import (
    SYNCS,
    SyncReport,
    _check_compatible,
    _encode,
    _exclusive,
    _numbers,
    sync_key,
)
from indexer.sync_plan import Hasher, Held, held_files, plan_sync
from indexer.sync_rows import Rows, Touched, accept_encoded, re_add_touched
from indexer.versions import collection_dir
from runtime.bundle import read_manifest


def sync_sharded(
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
    """Make the sharded ``collection`` hold exactly the ``kind`` files of ``folder``, as
    ``indexer.sync.sync_collection`` does for one collection."""
    started = time.perf_counter()
    root, folder = Path(root), Path(folder)
    sharded = read_sharded(root, collection)
    first_shard = shard_infos(root, collection)[0]
    chosen = bundle or (Path(sharded.model_bundle_path) if sharded.model_bundle_path else None)
    if chosen is None or not chosen.is_dir():
        raise CollectionError(
            f"collection {collection!r} was built with model bundle "
            f"{sharded.model_bundle_id[:12]}, which is not at {chosen}: name it with --bundle DIR"
        )
    spec = BuildSpec(
        collection=collection,
        root=root,
        bundle=chosen,
        corpus=str(folder),
        kind=kind,
        segment_seconds=first_shard.build.get("segment_seconds", 2.0),
        shard_size=shard_size,
        workers=workers,
        batch_size=batch_size,
        keep_versions=keep_versions,
    )
    manifest = read_manifest(spec.bundle, verify=False)
    _check_compatible(first_shard.model_copy(update={"collection": collection}), spec, manifest)
    try:
        scan = scan_media(folder, frozenset({kind}))
    except MediaScanError as error:
        raise CollectionError(str(error)) from None
    if progress is not None:
        progress(len(scan.files), len(scan.files), "scanning")
    with _exclusive(root, collection):
        hasher = Hasher()
        with LocalShards.open(root, collection, with_indexes=False) as shards:
            held: dict[str, Held] = {}
            for shard in shards.shards:
                for path, entry in held_files(shard)[0].items():
                    merged = held.setdefault(path, Held())
                    merged.items += entry.items
                    merged.primary = merged.primary or entry.primary
            if not scan.files and held:
                raise CollectionError(
                    f"{folder} holds no {kind} files now, but collection {collection!r} holds "
                    f"{len(held):,} of its files: refusing to remove them all (is the folder "
                    "mounted?); remove them with cots index remove"
                )
            plan = plan_sync(folder, scan.files, held, hasher)
            touched: list[Touched] = [
                (file, sha256, [(it, seg.lookup(np.array([it.id]))[0]) for it, seg in known.items])
                for file, known, sha256 in plan.touched
            ]
        max_id = max(info.max_id for info in shard_infos(root, collection))
        floor = next_record_number(spec.kind, max_id)
        work = collection_dir(root, collection) / SYNCS / sync_key(manifest, spec, plan.encode)
        encoded_shards: list[Shard] = []
        encoded = resumed = 0
        if plan.encode:
            first = _numbers(spec, work, len(plan.encode), floor)
            encoded_shards, encoded, resumed = _encode(
                spec, plan.encode, scan.captions, first, work, progress
            )
        rows = Rows()
        skipped = Counter(scan.skipped)
        added, changed = accept_encoded(plan, held, encoded_shards, hasher, rows, skipped)
        re_add_touched(spec, touched, rows, floor)
        skipped.update(plan.skipped)
        doomed = np.union1d(plan.removed_ids(), np.asarray(rows.replaced, dtype=np.int64))
        published = bool(rows.ids or len(doomed))
        if published:
            ids, vectors, items = rows.arrays(manifest.embed_dim)
            if progress is not None:
                progress(len(ids), len(ids), "publishing")
            add_sharded_encoded(
                root,
                collection,
                ids,
                vectors,
                items,
                keep_versions=keep_versions,
                skipped=dict(skipped),
                skipped_is_total=True,
                removed=doomed,
            )
        shutil.rmtree(work.parent, ignore_errors=True)
    return SyncReport(
        collection=collection,
        version=0,  # no one version: each shard has its own (cots index info lists them)
        published=published,
        added=added,
        changed=changed,
        touched=len(touched),
        removed=len(plan.gone),
        unchanged=plan.unchanged,
        encoded=encoded,
        resumed=resumed,
        hashed=hasher.files,
        skipped=dict(skipped),
        seconds=round(time.perf_counter() - started, 3),
    )
