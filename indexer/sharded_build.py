"""Splitting a collection into shards (``cots index shard``), or building a sharded one.

``source segments' files -> per shard (in this process, or as Ray tasks): its live items,
read a block at a time -> write_segment_streaming -> version 1 -> sharded.json, written last``

No process holds the whole collection: each shard reads the items it owns (``shard_of``)
from the source's segment files itself (``SegmentSource``: ids, stored vectors, metadata;
the delete set left out), so a Ray task needs only paths, on a file system every node sees.

Each shard is a normal collection under ``indexer.sharded.shard_root`` (``indexer.sharded``
describes the layout); its ``index.json`` is the source's with its own counts, segments and
digests, and the source's ``max_id``, so adds keep numbering after the largest id the
collection ever gave. A shard's index is what ``choose_factory`` picks for its own size,
except when the collection is IVF: then the coarse quantizer (and PQ codebooks) are trained
once, on the seeded sample of all the vectors that ``build_index`` would train on
(``indexer.large_segment.train_index``), and every shard starts from a copy of that trained
empty index (``write_segment_streaming(trained=)`` clones it). With one quantizer and the same
nprobe, the lists a query probes are the same in every shard as in the whole, so the merged
answer is the one an index over all the items, trained the same way, gives.

The source collection is locked while it is read and split: an add or remove that reaches it
meanwhile waits, then is refused (``indexer.update.commit`` checks ``is_sharded``). Its files
stay where they are, a snapshot of the moment it was split; ``sharded.json`` is the switch.
A split that fails leaves no ``sharded.json`` (the shard folders it wrote are removed by the
next split), so the collection stays the unsharded one.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

import faiss
import numpy as np
from tqdm import tqdm

from indexer.assemble import seal
from indexer.build_spec import MODALITY, CorpusKind
from indexer.collection import Collection
from indexer.errors import CollectionError
from indexer.faiss_choice import choose_factory
from indexer.faiss_index import check_vectors
from indexer.index_bundle import DELETED, FORMAT_VERSION, SEGMENTS, IndexInfo
from indexer.large_segment import (
    Chunk,
    Chunks,
    gather_rows,
    train_index,
    training_rows,
    write_segment_streaming,
)
from indexer.metadata import Item, MetadataStore
from indexer.segments import (
    SEGMENT_IDS,
    SEGMENT_METADATA,
    SEGMENT_VECTORS,
    index_fields,
    new_segment_id,
)
from indexer.sharded import ShardedInfo, is_sharded, shard_name, shard_of, shard_root
from indexer.versions import current_dir, locked, publish, staging

TRAIN_SAMPLE: Final = 100_000  # as indexer.faiss_index.build_index: raised to 39 per list

Parallel = Literal["local", "ray"]


def split_collection(
    root: Path,
    name: str,
    shards: int,
    replicas: int = 1,
    *,
    parallel: Parallel = "local",
    progress: bool = True,
    keep_versions: int = 3,
) -> ShardedInfo:
    """Split the live items of the unsharded collection ``name`` into ``shards`` shard
    collections and make it sharded; returns its ``sharded.json``. Each shard reads its items
    from the source's segment files itself, a block at a time (never the whole collection in
    one process)."""
    root = Path(root)
    if is_sharded(root, name):
        raise CollectionError(f"collection {name!r} is sharded already")
    _check_counts(shards, replicas)
    current_dir(root, name)  # a missing collection: its clear error, before the lock makes a folder
    with locked(root, name):
        # Under the lock nothing publishes, so no segment of the live version is deleted.
        with Collection.open(root, name, with_indexes=False) as source:
            if source.info.format_version < FORMAT_VERSION:
                raise CollectionError(
                    f"collection {name!r} is in index format 1; run `cots index compact "
                    f"--collection {name}` once, then split it"
                )
            folders = tuple(str(s.folder) for s in source.segments.segments)  # id order
            deleted = source.segments.deleted
            template, version = source.info, source.version
        everything = SegmentSource(folders, deleted, shards, None, with_items=False)
        counts = everything.counts()
        if shards > counts.sum():
            raise CollectionError(
                f"collection {name!r} has {counts.sum()} live items, fewer than the {shards} "
                "shards asked for: split it into fewer"
            )
        sources: list[Source] = [
            SegmentSource(folders, deleted, shards, i, count=int(counts[i])) for i in range(shards)
        ]
        return _write_shards(
            root,
            name,
            template,
            everything,
            int(counts.sum()),
            sources,
            replicas,
            parallel=parallel,
            progress=progress,
            keep_versions=keep_versions,
            source_version=version,
        )


def build_sharded(
    root: Path,
    name: str,
    ids: np.ndarray,
    vectors: np.ndarray,
    items: Sequence[Item],
    shards: int,
    replicas: int = 1,
    *,
    kind: CorpusKind = "image",
    model_bundle_id: str,
    model_bundle_path: str | None = None,
    factory: str = "auto",
    fields: Sequence[str] = (),
    parallel: Parallel = "local",
    progress: bool = True,
    keep_versions: int = 3,
) -> ShardedInfo:
    """A new sharded collection ``name`` of ``vectors`` with ``ids`` and their ``items``
    (already encoded: tests, benchmarks). ``factory`` is the whole collection's ("auto":
    ``choose_factory`` for all the vectors); ``fields``: metadata keys indexed for filters."""
    root = Path(root)
    if (root / name).exists():
        raise CollectionError(f"{root / name} exists already; choose another collection name")
    _check_counts(shards, replicas)
    if shards > len(ids):
        raise CollectionError(f"{len(ids)} items cannot be split into {shards} shards")
    order = np.argsort(np.asarray(ids, dtype=np.int64), kind="stable")
    ids = np.asarray(ids, dtype=np.int64)[order]
    vectors = check_vectors(np.ascontiguousarray(np.asarray(vectors, np.float32)[order]), "vectors")
    by_id = {item.id: item for item in items}
    rows = [by_id[int(i)] for i in ids]
    dim = vectors.shape[1]
    template = IndexInfo(
        collection=name,
        kind=kind,
        modality=MODALITY[kind],
        count=len(ids),
        live=len(ids),
        dim=dim,
        factory=choose_factory(len(ids), dim) if factory == "auto" else factory,
        model_bundle_id=model_bundle_id,
        model_bundle_path=model_bundle_path,
        recall_at_10=0.0,
        build={"index_fields": list(fields), "kind": kind},
        created=_now(),
        max_id=int(ids[-1]),
    )
    owners = shard_of(ids, shards)
    sources: list[Source] = []
    for i in range(shards):
        mine = np.flatnonzero(owners == i)
        sources.append(ArraySource(ids[mine], vectors[mine], [rows[j] for j in mine]))
    with locked(root, name):
        return _write_shards(
            root,
            name,
            template,
            ArraySource(ids, vectors, rows),
            len(ids),
            sources,
            replicas,
            parallel=parallel,
            progress=progress,
            keep_versions=keep_versions,
            source_version=None,
        )


@dataclass(frozen=True)
class SegmentSource:
    """The live items of the source collection's segments (``folders``, in id order, read
    a block at a time) that ``shard`` of ``shards`` owns (None: all), as chunks for
    ``write_segment_streaming``. Picklable: a Ray task reads the files itself, so they must be
    on a file system every node sees."""

    folders: tuple[str, ...]
    deleted: np.ndarray
    shards: int
    shard: int | None
    count: int = 0
    with_items: bool = True
    block: int = 65_536

    def __call__(self) -> Iterator[Chunk]:
        for folder in map(Path, self.folders):
            ids = np.load(folder / SEGMENT_IDS, mmap_mode="r")
            vectors = np.load(folder / SEGMENT_VECTORS, mmap_mode="r")
            store = MetadataStore.open(folder / SEGMENT_METADATA) if self.with_items else None
            try:
                for start in range(0, len(ids), self.block):
                    block = np.asarray(ids[start : start + self.block])
                    keep = self._keep(block)
                    if not keep.any():
                        continue
                    mine = block[keep]
                    rows = np.asarray(vectors[start : start + self.block][keep], np.float32)
                    yield mine, rows, self._items(store, mine)
            finally:
                if store is not None:
                    store.close()

    def _keep(self, ids: np.ndarray) -> np.ndarray:
        keep = ~np.isin(ids, self.deleted)
        if self.shard is not None:
            keep &= shard_of(ids, self.shards) == self.shard
        return keep

    def _items(self, store: MetadataStore | None, ids: np.ndarray) -> list[Item]:
        if store is None:
            return []
        found = store.get(ids)
        missing = [int(i) for i, item in zip(ids, found, strict=True) if item is None]
        if missing:
            raise CollectionError(f"segment metadata lacks the rows of ids {missing[:5]}")
        return [item for item in found if item is not None]

    def counts(self) -> np.ndarray:
        """Live items each shard owns (ids only are read)."""
        total = np.zeros(self.shards, dtype=np.int64)
        for folder in map(Path, self.folders):
            ids = np.load(folder / SEGMENT_IDS)
            live = ids[~np.isin(ids, self.deleted)]
            total += np.bincount(shard_of(live, self.shards), minlength=self.shards)
        return total


@dataclass(frozen=True)
class ArraySource:
    """Items in memory (ascending ids) as one chunk."""

    ids: np.ndarray
    vectors: np.ndarray
    items: list[Item]

    @property
    def count(self) -> int:
        return len(self.ids)

    def __call__(self) -> Iterator[Chunk]:
        if len(self.ids):
            yield self.ids, self.vectors, self.items


def _check_counts(shards: int, replicas: int) -> None:
    if shards < 2:
        raise CollectionError(f"a sharded collection has at least 2 shards, not {shards}")
    if replicas < 1:
        raise CollectionError(f"each shard needs at least 1 replica, not {replicas}")


Source = SegmentSource | ArraySource


def _write_shards(
    root: Path,
    name: str,
    template: IndexInfo,
    everything: Chunks,
    total: int,
    sources: Sequence[Source],
    replicas: int,
    *,
    parallel: Parallel,
    progress: bool,
    keep_versions: int,
    source_version: int | None,
) -> ShardedInfo:
    """Every shard's version 1 (shard i from ``sources[i]``), then ``sharded.json`` (the
    caller holds the lock of ``name``). ``everything``: all ``total`` items, for training the
    shared IVF quantizer."""
    trained = None
    if _is_ivf(template.factory):
        trained = train_shared(everything, total, template.factory, template.dim)
    blob = None if trained is None else faiss.serialize_index(trained)
    folder = shard_root(root, name)
    if folder.exists():  # shards of a split that failed before sharded.json: never served
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    jobs = [
        (str(folder), i, source, template.model_dump_json(), blob, keep_versions)
        for i, source in enumerate(sources)
    ]
    shards = len(sources)
    bar = tqdm(total=shards, desc=f"sharding {name}", unit="shard", disable=not progress)
    with bar:
        if parallel == "ray":
            _build_with_ray(jobs, bar)
        elif parallel == "local":
            for job in jobs:
                build_shard(*job)
                bar.update(1)
        else:
            raise ValueError(f"parallel is 'local' or 'ray', not {parallel!r}")
    info = ShardedInfo(
        shards=shards,
        replicas=replicas,
        dim=template.dim,
        model_bundle_id=template.model_bundle_id,
        model_bundle_path=template.model_bundle_path,
        kind=template.kind,
        factory=template.factory,
        created=_now(),
        source_version=source_version,
        shared_quantizer=trained is not None,
    )
    info.write(Path(root) / name)
    return info


def _build_with_ray(jobs: list[tuple[Any, ...]], bar: tqdm[Any]) -> None:
    """Each shard as a Ray task of one CPU (on the caller's cluster, ``RAY_ADDRESS``'s, or a
    local one started for this): the shard folders must be on a file system every node sees."""
    try:
        import ray
    except ImportError as missing:
        raise CollectionError(
            f"building shards as Ray tasks needs Ray ({missing}): "
            "pip install 'cots-search[distributed]'"
        ) from None
    started = False
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
        started = True
    try:
        task = ray.remote(num_cpus=1)(build_shard)
        pending = [task.remote(*job) for job in jobs]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
            bar.update(len(done))
    finally:
        if started:
            ray.shutdown()


def build_shard(
    folder: str,
    shard: int,
    source: Source,
    template_json: str,
    trained: np.ndarray | None,
    keep_versions: int,
) -> str:
    """Write and publish version 1 of shard ``shard`` under the shard root ``folder`` from
    ``source``'s chunks; returns its index.json. ``trained``: the serialized trained empty
    index every shard copies (IVF), else None (the shard's factory is chosen for its own
    size). Runs as a Ray task too."""
    root, name = Path(folder), shard_name(shard)
    template = IndexInfo.model_validate_json(template_json)
    factory = (
        template.factory if trained is not None else choose_factory(source.count, template.dim)
    )
    with staging(root, name) as staged:
        written = write_segment_streaming(
            staged / SEGMENTS / new_segment_id(),
            source,
            count=source.count,
            dim=template.dim,
            factory=factory,
            index_fields=index_fields(template.build),
            trained=None if trained is None else faiss.deserialize_index(trained),
        )
        np.save(staged / DELETED, np.zeros(0, dtype=np.int64))
        info = template.model_copy(
            update={
                "collection": name,
                "format_version": FORMAT_VERSION,
                "factory": factory,
                "count": written.count,
                "live": written.count,
                "recall_at_10": written.recall_at_10,
                "segments": [written.id],
                "tombstones": 0,
                "skipped": {},
                "created": _now(),
                "files": {},
            }
        )
        info = seal(info, staged)
        info.write(staged)
        publish(root, name, staged, keep_versions)
    return info.model_dump_json()


def train_shared(everything: Chunks, count: int, factory: str, dim: int) -> faiss.Index:
    """An empty ``factory`` index trained on the rows of all ``count`` items that
    ``build_index`` would train an index of them on (``indexer.large_segment``), search
    defaults set."""
    rows = training_rows(count, factory, dim, TRAIN_SAMPLE, seed=0)
    return train_index(gather_rows(everything, rows, dim), factory, dim)


def _is_ivf(factory: str) -> bool:
    return factory.startswith("IVF")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
