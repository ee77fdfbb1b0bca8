"""``--engine ray``: the encoding half of ``cots index build`` as a Ray Data pipeline.

What runs where:

- the driver (the process running ``cots index build``) lists the corpus, cuts the pending
  shards into the same chunks as the local engine, and writes each finished shard under
  ``builds/<key>/`` the moment its last chunk comes back, so a killed build resumes as the local
  one does and ends with the same shard files (ids, vectors, items, skipped items);
- CPU tasks (``map_batches``) decode and preprocess chunks with
  :func:`indexer.shards.prepare_chunk`;
- an actor pool (``map_batches`` with a callable class) embeds them: each actor loads one
  :class:`runtime.encoder.Encoder` once. On a cluster with GPUs there is one actor per GPU
  (install ``onnxruntime-gpu`` there); without, actors take one CPU each and the pool grows up
  to half the cluster's CPUs, leaving the rest to decoding. ``COTS_RAY_ENCODERS`` fixes the
  number of actors.

The cluster: an already initialised Ray (a notebook, a test) is used and left running; else
``RAY_ADDRESS`` names one to connect to; else a local cluster of ``max(2, workers + 1)`` CPUs
is started for the build and shut down after it. To use a real cluster::

    RAY_ADDRESS=ray://head:10001 cots index build --engine ray --root /shared/indexes \\
        --collection photos --bundle /shared/bundles/cots-tiny --corpus /shared/data/images.csv

``ray://`` (Ray Client) needs ``ray[client]`` on the driver; from a machine inside the cluster
network ``RAY_ADDRESS=head:6379`` connects directly, and ``ray job submit --address
http://head:8265 -- cots index build --engine ray ...`` runs the driver on the cluster. A
cluster made by ``ray start`` uses token authentication by default (Ray 2.60): set
``RAY_AUTH_MODE=token`` and give the driver the cluster's token.

Every node needs the same Python environment (``pip install
'cots-search[serving,distributed]'``, plus ``onnxruntime-gpu`` on GPU nodes), and the model
bundle and the corpus files must be readable at the same absolute paths on every node (shared
storage: NFS, a parallel file system, a FUSE-mounted bucket). Relative corpus paths are made
absolute on the driver first. Records listed from WebDataset shards carry their bytes and need
no shared corpus; the bundle always does. Only the driver writes the collection root.
"""

from __future__ import annotations

import os
import pickle
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Final

from tqdm import tqdm

from indexer.build_spec import MODALITY, BuildSpec, CorpusKind
from indexer.errors import CollectionError
from indexer.shards import (
    Progress,
    Record,
    Shard,
    ShardPlan,
    chunk_records,
    embed_chunk,
    prepare_chunk,
)
from runtime.bundle import BundleManifest, read_manifest
from runtime.encoder import Encoder
from runtime.spec import ImageSpec, VideoSpec

try:
    import pyarrow as pa
    import ray
    import ray.data
    import ray.exceptions
except ImportError as missing:  # the base install has no Ray: say how to get it
    raise CollectionError(
        f"the ray engine needs Ray Data ({missing}): pip install 'cots-search[distributed]'"
    ) from None

# Input blocks: one per chunk lets every decode task start at once; past this many the blocks
# hold several chunks each, so the driver does not create millions of tiny objects.
MAX_INPUT_BLOCKS: Final = 4096
ENCODERS_ENV: Final = "COTS_RAY_ENCODERS"
ACTOR_OVERHEAD: Final = 512 << 20


def _decode(
    batch: pa.Table,
    kind: CorpusKind,
    image: ImageSpec,
    video: VideoSpec,
    segment_seconds: float,
) -> pa.Table:
    """Records -> pickled :class:`Chunk` (pixels, frames or texts, and items)."""
    chunks = [
        pickle.dumps(prepare_chunk(kind, pickle.loads(blob), image, video, segment_seconds))
        for blob in batch.column("records").to_pylist()
    ]
    # large_binary: a block of video chunks can pass 2 GiB, the limit of Arrow's plain binary.
    return batch.drop_columns(["records"]).append_column(
        "chunk", pa.array(chunks, pa.large_binary())
    )


class _Embedder:
    """An actor holding one encoder: chunks -> pickled partial shards."""

    def __init__(self, bundle: str, kind: CorpusKind, batch_size: int, threads: int | None):
        self.encoder = Encoder(bundle, batch_size=batch_size, threads=threads)
        self.modality = MODALITY[kind]
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        parts = [
            pickle.dumps(
                embed_chunk(self.encoder, self.modality, pickle.loads(blob), self.batch_size)
            )
            for blob in batch.column("chunk").to_pylist()
        ]
        return batch.drop_columns(["chunk"]).append_column(
            "part", pa.array(parts, pa.large_binary())
        )


@contextmanager
def connected(workers: int) -> Iterator[None]:
    """Ray as this module's docstring says: the caller's, ``RAY_ADDRESS``'s, or a local one."""
    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local": start a new cluster even when `ray start` left one running on this machine.
        ray.init(
            address="local",
            num_cpus=max(2, workers + 1),
            include_dashboard=False,
            log_to_driver=False,
        )
    try:
        yield
    finally:
        # For a cluster we started this stops it; for RAY_ADDRESS's it only disconnects.
        ray.shutdown()


def encode_shards_with_ray(
    spec: BuildSpec,
    records: list[Record],
    work: Path,
    progress: Progress | None,
    bar_shown: bool = True,
) -> list[Path]:
    """Encode every shard not saved yet on a Ray cluster; returns all shard paths in order
    (``bar_shown``: the terminal's progress bar)."""
    plan = ShardPlan.scan(spec, len(records), work)
    if not plan.pending:
        return plan.paths
    rows, parts_of = _input_rows(spec, records, plan)
    manifest = read_manifest(spec.bundle, verify=False)  # build_collection verified it
    done = plan.done
    bar = tqdm(
        total=plan.total,
        initial=done,
        desc=f"indexing {spec.collection}",
        unit="item",
        disable=not bar_shown,
    )
    with bar, connected(spec.workers):
        dataset = _pipeline(spec, rows, manifest)
        arrived: dict[int, dict[int, Shard]] = defaultdict(dict)
        try:
            for row in dataset.iter_rows():
                shard, index = int(row["shard"]), int(row["index"])
                arrived[shard][index] = pickle.loads(row["part"])
                bar.update(int(row["count"]))
                if len(arrived[shard]) < parts_of[shard]:
                    continue
                # Saved as soon as complete, in whatever order shards finish: a killed build
                # keeps every finished shard. Within a shard, chunks go back in record order.
                parts = arrived.pop(shard)
                joined = Shard.join([parts[i] for i in range(len(parts))], manifest.embed_dim)
                joined.save(plan.paths[shard])
                start, end = plan.bounds(shard)
                done += end - start
                if progress is not None:
                    progress(done, plan.total, "encoding")
        except ray.exceptions.RayError as error:  # e.g. a node cannot read the bundle
            raise CollectionError(f"the Ray pipeline failed: {error}") from error
    missing = [str(path) for path in plan.paths if not path.is_file()]
    if missing:  # a pipeline that lost rows must not publish an index without them
        raise CollectionError(f"the Ray pipeline ended without {', '.join(missing)}")
    return plan.paths


def _input_rows(
    spec: BuildSpec, records: list[Record], plan: ShardPlan
) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """One row per chunk of the pending shards (cut as the local engine cuts them), and the
    number of chunks of each shard."""
    rows: list[dict[str, Any]] = []
    parts_of: dict[int, int] = {}
    for shard in plan.pending:
        start, end = plan.bounds(shard)
        numbered = [
            (number, _absolute(record)) for number, record in enumerate(records[start:end], start)
        ]
        chunks = chunk_records(spec, numbered)
        parts_of[shard] = len(chunks)
        rows += [
            {"shard": shard, "index": i, "count": len(chunk), "records": pickle.dumps(chunk)}
            for i, chunk in enumerate(chunks)
        ]
    return rows, parts_of


def _absolute(record: Record) -> Record:
    # Workers do not share the driver's working directory (nor, on a cluster, its machine).
    if record.path is not None and not record.path.is_absolute():
        return replace(record, path=record.path.absolute())
    return record


def _pipeline(
    spec: BuildSpec, rows: list[dict[str, Any]], manifest: BundleManifest
) -> ray.data.Dataset:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's tqdm bar counts records instead
    dataset: ray.data.Dataset = ray.data.from_items(
        rows, override_num_blocks=min(len(rows), MAX_INPUT_BLOCKS)
    )
    decode = partial(
        _decode,
        kind=spec.kind,
        image=manifest.image,
        video=manifest.video,
        segment_seconds=spec.segment_seconds,
    )
    dataset = dataset.map_batches(decode, batch_size=1, batch_format="pyarrow", num_cpus=1)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    fixed = int(os.environ[ENCODERS_ENV]) if os.environ.get(ENCODERS_ENV) else None
    pool = (
        ray.data.ActorPoolStrategy(size=fixed or gpus)
        if fixed or gpus
        else ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cpus // 2))
    )
    return dataset.map_batches(
        _Embedder,
        batch_size=1,  # one chunk: the encoder batches it as the local engine does
        batch_format="pyarrow",
        compute=pool,
        fn_constructor_kwargs={
            "bundle": str(Path(spec.bundle).absolute()),
            "kind": spec.kind,
            "batch_size": spec.batch_size,
            # One ONNX Runtime thread per reserved CPU; on a GPU the threads hardly matter.
            "threads": None if gpus else 1,
        },
        num_cpus=1,
        num_gpus=1 if gpus else 0,
        # Reserving the model's memory keeps Ray from packing more actors on a node than fit.
        # It also makes the two stages' resource requests differ, which stops Ray Data from
        # fusing decoding into the actors: decoding stays in CPU tasks that scale on their own.
        memory=_actor_memory(spec, manifest),
    )


def _actor_memory(spec: BuildSpec, manifest: BundleManifest) -> int:
    """Bytes an encoder actor needs: twice its largest model file (ONNX Runtime's copy and its
    optimised graph) and room for a batch and the runtime's arenas."""
    variants = manifest.models.get(MODALITY[spec.kind], {}).values()
    largest = max((Path(spec.bundle, name).stat().st_size for name in variants), default=0)
    return 2 * largest + ACTOR_OVERHEAD
