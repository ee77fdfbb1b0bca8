"""``cots bench index``: what indexing costs beyond the encoder, and FAISS speed and recall.

``cots bench index build`` times ``cots index build`` on an image corpus against the encoder
alone on the same bundle and images: ``Encoder.encode_images(paths)`` (decode, preprocess,
encode in one process, the way a caller without the indexer would) and the model alone on
preprocessed pixels. The goal is build/encoder ≥ 0.8: listing, shards, metadata and FAISS
should cost little next to embedding.
"""

from __future__ import annotations

import csv
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

import click

from benchmarks.index_faiss import faiss_bench
from benchmarks.index_filter import filter_bench
from benchmarks.index_scale import scale_bench
from benchmarks.index_sync import sync_bench
from benchmarks.index_updates import updates_bench


@click.command("build", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bundle", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--corpus", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--split", default=None, help="Only this split (default: all images).")
@click.option("--limit", type=click.IntRange(min=64), default=4096, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False, path_type=Path))
def build_bench(
    bundle: Path,
    corpus: Path,
    split: str | None,
    limit: int,
    workers: int,
    threads: int,
    json_out: Path | None,
) -> None:
    """Items/s of cots index build against the encoder alone, on the first --limit images."""
    import numpy as np

    from indexer.build import build_collection
    from indexer.build_spec import BuildSpec
    from model.data.readers import load_image, open_image_corpus
    from runtime.encoder import Encoder
    from runtime.images import preprocess_images

    records = list(itertools.islice(open_image_corpus(corpus, split=split).records(), limit))
    paths = [r.path for r in records if r.path is not None]
    encoder = Encoder(bundle, threads=threads)
    with tempfile.TemporaryDirectory() as scratch:
        subset = Path(scratch) / "corpus.csv"
        with subset.open("w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["filepath", "caption", "image_id"])
            writer.writerows([str(r.path), r.captions[0], r.group_id] for r in records if r.path)
        encoder.encode_images(paths[:64])  # warm up the session
        start = time.perf_counter()
        encoder.encode_images(paths)
        encoder_s = time.perf_counter() - start
        pixels = preprocess_images([load_image(r) for r in records], encoder.manifest.image)
        start = time.perf_counter()
        for offset in range(0, len(pixels), 64):
            encoder.run("image", np.ascontiguousarray(pixels[offset : offset + 64]))
        model_s = time.perf_counter() - start
        spec = BuildSpec(
            collection="bench",
            root=Path(scratch) / "indexes",
            bundle=bundle,
            corpus=str(subset),
            workers=workers,
        )
        start = time.perf_counter()
        build_collection(spec)
        build_s = time.perf_counter() - start
    n = len(paths)
    row = {
        "items": n,
        "encoder_items_per_s": n / encoder_s,
        "model_items_per_s": n / model_s,
        "build_items_per_s": n / build_s,
        "ratio_build_to_encoder": encoder_s / build_s,
        "workers": workers,
        "threads": threads,
        "cpu": platform.processor() or platform.machine(),
    }
    click.echo(f"{n} images, {workers} decoding workers, {threads} ORT threads, {row['cpu']}")
    click.echo("| path | items/s |")
    click.echo("|---|---|")
    click.echo(f"| model alone (preprocessed pixels) | {row['model_items_per_s']:.0f} |")
    click.echo(f"| Encoder.encode_images(paths) | {row['encoder_items_per_s']:.0f} |")
    click.echo(f"| cots index build (Flat) | {row['build_items_per_s']:.0f} |")
    click.echo(f"build / encoder: {row['ratio_build_to_encoder']:.2f} (goal >= 0.8)")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(row, indent=2) + "\n")


index_bench = click.Group(
    "index",
    commands={
        "build": build_bench,
        "faiss": faiss_bench,
        "updates": updates_bench,
        "filter": filter_bench,
        "sync": sync_bench,
        "scale": scale_bench,
    },
    help="Indexing cost against the encoder (build), FAISS QPS/recall/memory (faiss), what "
    "adds, removes, swaps and compaction cost on a segmented collection (updates), and "
    "filtered search against unfiltered (filter), keeping a large folder in sync (sync), and "
    "collections larger than RAM (scale).",
)
