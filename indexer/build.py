"""``cots index build``: embed a corpus with a model bundle into a new version of a collection.

The corpus is listed once, cheaply, and cut into shards of ``shard_size`` records. Each shard
is decoded by a pool of worker processes while the main process encodes the previous chunk,
and is saved (ids, vectors, metadata, skipped items) under ``builds/<key>/`` before the next
begins; a re-run of the same build skips the saved shards, so a killed build resumes and ends
with the same content as an uninterrupted one. Only when every shard is done is the FAISS index
built, in a staging folder that ``indexer.versions.publish`` renames into place and makes
current.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from indexer.assemble import assemble_version
from indexer.build_spec import BuildSpec
from indexer.errors import CollectionError
from indexer.shards import Progress, Shard, encode_shards_locally, list_records, skipped_summary
from runtime.bundle import BundleManifest, read_manifest

BUILDS: Final = "builds"
# Metadata keys every image and video collection indexes (indexer.file_metadata): the filters
# users reach for first, by date and by folder.
MEDIA_INDEX_FIELDS: Final = ("taken", "folder")
MAX_INDEX_FIELDS: Final = 16  # BuildSpec.index_fields' own limit


def with_media_index_fields(spec: BuildSpec) -> BuildSpec:
    """``spec`` with ``taken`` and ``folder`` added to its indexed fields when it embeds
    images or videos (up to the limit of indexed fields); a caption build as it is."""
    if spec.kind == "caption":
        return spec
    fields = list(spec.index_fields)
    for key in MEDIA_INDEX_FIELDS:
        if key not in fields and len(fields) < MAX_INDEX_FIELDS:
            fields.append(key)
    return spec.model_copy(update={"index_fields": fields})


def build_key(spec: BuildSpec, manifest: BundleManifest) -> str:
    """What decides a build's shards: the same key means a re-run may reuse them."""
    corpus = Path(spec.corpus)
    stat = corpus.stat() if corpus.is_file() else None
    fields = {
        "bundle": manifest.bundle_id,
        "corpus": str(corpus.resolve()),
        "corpus_file": [stat.st_size, stat.st_mtime_ns] if stat else None,
        **spec.model_dump(mode="json", include={"kind", "split", "segment_seconds", "shard_size"}),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def build_collection(
    spec: BuildSpec, *, progress: Progress | None = None, bar_shown: bool = True
) -> int:
    """Build ``spec.collection`` from ``spec.corpus``; returns the new, now current, version
    (``bar_shown``: the terminal's progress bar while encoding)."""
    if spec.engine == "ray":
        # Imported on use: it imports Ray Data, of the optional distributed extra, which the
        # serving image lacks (tests/test_layering.py still sees this edge: it hides no cycle).
        from indexer.ray_engine import encode_shards_with_ray

        encode_shards = encode_shards_with_ray
    else:
        encode_shards = encode_shards_locally
    spec = with_media_index_fields(spec)
    manifest = read_manifest(spec.bundle)
    records, listing_skipped = list_records(spec)
    if not records:
        raise CollectionError(f"corpus {spec.corpus} lists no items (split {spec.split!r})")
    work = Path(spec.root) / spec.collection / BUILDS / build_key(spec, manifest)
    work.mkdir(parents=True, exist_ok=True)
    with _exclusive(work):
        (work / "spec.json").write_text(spec.model_dump_json(indent=2))
        paths = encode_shards(spec, records, work, progress, bar_shown)
        shards = [Shard.load(path) for path in paths]
        skipped = skipped_summary(shards, listing_skipped)
        version = assemble_version(spec, manifest, shards, skipped, progress)
        shutil.rmtree(work, ignore_errors=True)
        work.with_name(f"{work.name}.lock").unlink(missing_ok=True)
    return version


@contextmanager
def _exclusive(work: Path) -> Iterator[None]:
    """One process per build folder: the same build queued twice must not write the same
    shards at once. The lock dies with its process, so a killed build never leaves it held."""
    with (work.parent / f"{work.name}.lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CollectionError(
                f"the same build is already running (lock {lock.name}); wait for it to finish"
            ) from None
        yield
