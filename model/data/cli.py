"""``cots data``: synthesise the default corpus, inspect any corpus, convert between formats."""

from __future__ import annotations

import logging
from pathlib import Path

import click
from pydantic import ValidationError

FORMATS = ("csv", "folder", "webdataset", "karpathy")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def data() -> None:
    """Synthesise, inspect and convert image/video-caption corpora."""


def _config_error(error: ValidationError) -> click.UsageError:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in error.errors()
    )
    return click.UsageError(problems)


@data.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("data/synthetic"),
    show_default=True,
    help="Folder to write the corpus into. It must be empty or missing (see --overwrite).",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Random seed. The same seed and options give byte-identical files.",
)
@click.option(
    "--n-images",
    type=int,
    default=10_000,
    show_default=True,
    help="Number of images (scenes of 1-3 shapes), over all splits.",
)
@click.option(
    "--n-videos",
    type=int,
    default=1_000,
    show_default=True,
    help="Number of videos (one object moving, growing, shrinking or changing colour).",
)
@click.option(
    "--image-size",
    type=int,
    default=64,
    show_default=True,
    help="Side of the square PNG images, in pixels.",
)
@click.option(
    "--video-size",
    type=int,
    default=64,
    show_default=True,
    help="Side of the square video frames, in pixels (even, for H.264).",
)
@click.option("--video-frames", type=int, default=16, show_default=True, help="Frames per video.")
@click.option(
    "--video-fps",
    type=int,
    default=8,
    show_default=True,
    help="Video frame rate; duration = frames / fps.",
)
@click.option(
    "--max-captions",
    type=int,
    default=5,
    show_default=True,
    help="Each image gets between 1 and this many captions (at most 5).",
)
@click.option(
    "--val-fraction",
    type=float,
    default=0.05,
    show_default=True,
    help="Fraction of images and videos in the val split.",
)
@click.option(
    "--test-fraction",
    type=float,
    default=0.10,
    show_default=True,
    help="Fraction of images and videos in the test split.",
)
@click.option(
    "--heldout-fraction",
    type=float,
    default=0.05,
    show_default=True,
    help="Fraction of images in the 'heldout' split: every one of its scenes holds a "
    "colour-shape pair that never occurs in train, val or test.",
)
@click.option(
    "--n-heldout-combinations",
    type=int,
    default=8,
    show_default=True,
    help="How many colour-shape pairs to hold out (0-8; each uses a different colour and shape).",
)
@click.option(
    "--workers",
    type=int,
    default=None,
    help="Worker processes. Default: one per available core. The output does not depend on it.",
)
@click.option("--overwrite", is_flag=True, help="Replace the corpus in --out if there is one.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def synth(out: Path, workers: int | None, overwrite: bool, quiet: bool, **options: object) -> None:
    """Render the embedded default corpus: images, videos, captions and splits.

    Writes OUT/images.csv (columns filepath,caption,image_id,split; one row per caption, paths
    relative to the CSV), OUT/videos.csv (filepath,caption,video_id,split), the PNG and mp4
    files, and OUT/dataset.json describing the corpus (configuration, counts per split,
    vocabulary and the held-out colour-shape pairs).

    The corpus is written to OUT.partial and moved to OUT when complete, so an interrupted run
    never leaves a corpus that looks finished.
    """
    from model.data.synth import SynthConfig, generate_corpus

    try:
        config = SynthConfig(**options)  # type: ignore[arg-type]
    except ValidationError as error:
        raise _config_error(error) from None
    if workers is not None and workers < 1:
        raise click.BadParameter(f"must be at least 1, got {workers}", param_hint="--workers")
    try:
        description = generate_corpus(
            out, config, workers=workers, overwrite=overwrite, progress=not quiet
        )
    except FileExistsError as error:
        raise click.ClickException(f"{error} (use --overwrite to replace it)") from None
    images, videos = description["images"], description["videos"]
    click.echo(
        f"wrote {images['count']:,} images ({images['captions']:,} captions) and "
        f"{videos['count']:,} videos ({videos['captions']:,} captions) to {out} "
        f"in {description['elapsed_s']:.1f} s"
    )
    click.echo(f"image splits: {images['splits']}; video splits: {videos['splits']}")
    held = ", ".join(f"{c} {s}" for c, s in description["heldout_combinations"])
    click.echo(f"held-out colour-shape pairs: {held or 'none'}")


@data.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "--split", default=None, help="Only items of this split (where the format has splits)."
)
@click.option("--show", type=int, default=5, show_default=True, help="Samples to print.")
@click.option(
    "--video", is_flag=True, help="SOURCE is a video CSV (filepath,caption,video_id,split)."
)
def inspect(source: Path, split: str | None, show: int, video: bool) -> None:
    """Read a corpus as training and indexing will, and report what it holds and what it skips.

    SOURCE is a CSV file, a Karpathy-split JSON file, a WebDataset .tar (or a folder of them),
    or a folder of images with same-named .txt captions. Every item is decoded, so corrupt
    files are found here and not halfway through a training run.
    """
    from tqdm import tqdm

    from model.data.readers import VideoCsvReader, open_image_corpus
    from model.data.records import CorpusError

    try:
        reader = (
            VideoCsvReader(source, split=split) if video else open_image_corpus(source, split=split)
        )
    except CorpusError as error:
        raise click.ClickException(str(error)) from None
    n_items = n_captions = 0
    groups: set[str] = set()
    for sample in tqdm(reader.samples(), desc="reading", unit="item"):
        n_items += 1
        n_captions += len(sample.captions)
        groups.add(sample.group_id)
        if n_items <= show:
            click.echo(f"{sample.record.uri} [{sample.group_id}]")
            for caption in sample.captions:
                click.echo(f"    {caption}")
    click.echo(f"{n_items:,} items, {n_captions:,} captions, {len(groups):,} groups")
    click.echo(reader.report.summary())
    for where, reason in reader.report.examples:
        click.echo(f"  skipped {where}: {reason}")


@data.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice(FORMATS), required=True, help="Format to write.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder to write into (must be empty or missing).",
)
@click.option("--split", default=None, help="Only items of this split.")
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Items per WebDataset shard.",
)
def convert(source: Path, target: str, out: Path, split: str | None, shard_size: int) -> None:
    """Convert an image corpus to another format (CSV, folder, WebDataset or Karpathy JSON).

    Images are re-encoded as PNG, so pixels are kept exactly; captions, group ids and splits
    are kept where the target format can hold them.
    """
    from tqdm import tqdm

    from model.data import writers
    from model.data.readers import open_image_corpus
    from model.data.records import CorpusError

    if out.exists() and any(out.iterdir()):
        raise click.ClickException(f"{out} exists and is not empty")
    try:
        reader = open_image_corpus(source, split=split)
    except CorpusError as error:
        raise click.ClickException(str(error)) from None
    samples = tqdm(reader.samples(), desc="converting", unit="item")
    if target == "csv":
        writers.write_csv(samples, out)
    elif target == "folder":
        writers.write_folder(samples, out)
    elif target == "webdataset":
        writers.write_webdataset(samples, out, shard_size=shard_size)
    else:
        writers.write_karpathy(samples, out)
    click.echo(reader.report.summary())
    logging.getLogger("cots.data").info("wrote %s corpus to %s", target, out)
    click.echo(f"wrote {target} corpus to {out}")
