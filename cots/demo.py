"""``cots demo``: the end-to-end demo on the embedded synthetic corpus.

Each step reuses what an earlier run finished, so a second run is quick: the demo synthesises
the corpus, shows a sample read back through the corpus reader, trains the default model,
reports its recall, exports the model bundle, builds the image, caption and video collections,
runs a few example queries through the search engine, and serves the API and the search page.
The indexing and serving steps live in :mod:`cots.demo_serve`.
"""

from __future__ import annotations

import textwrap
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Final

import click
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    from model.config import TrainConfig

_CAPTION_LINES = 4

# The README's "Your own photos" commands (tests/test_own_media.py checks they are the same).
OWN_PHOTOS_COMMANDS: Final = (
    "cots quickstart ~/Pictures --model ViT-B-32 --pretrained ViT-B-32.pt",
    'cots search "a dog on the beach" --collection photos --min-score 0.25 --sort=-taken',
    "cots index sync --collection photos --corpus ~/Pictures",
    "cots index duplicates --collection photos --min-score 0.97",
)


def _synthesise(corpus: Path, config_options: dict[str, int], quiet: bool) -> dict:
    from model.data.synth import SynthConfig, generate_corpus, read_dataset_json

    config = SynthConfig(**config_options)
    existing = read_dataset_json(corpus)
    if existing is not None and existing.get("config") == config.model_dump():
        click.echo(f"[1/6] corpus: reusing {corpus}")
        return existing
    click.echo(f"[1/6] corpus: rendering {config.n_images:,} images and {config.n_videos:,} videos")
    description = generate_corpus(corpus, config, overwrite=True, progress=not quiet)
    click.echo(f"      done in {description['elapsed_s']:.1f} s")
    return description


def _contact_sheet(samples: list, path: Path, tile: int = 128) -> None:
    """A grid of sample images with their first caption underneath, for a quick look."""
    cols = 4
    rows = (len(samples) + cols - 1) // cols
    caption_h = 12 * _CAPTION_LINES
    sheet = Image.new("RGB", (cols * tile, rows * (tile + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, sample in enumerate(samples):
        x, y = (i % cols) * tile, (i // cols) * (tile + caption_h)
        image = sample.image.convert("RGB").resize((tile, tile), Image.Resampling.NEAREST)
        sheet.paste(image, (x, y))
        lines = textwrap.wrap(sample.captions[0], width=24)
        if len(lines) > _CAPTION_LINES:
            lines = [*lines[: _CAPTION_LINES - 1], lines[_CAPTION_LINES - 1][:21] + "..."]
        draw.multiline_text((x + 2, y + tile + 1), "\n".join(lines), fill=(0, 0, 0), spacing=1)
    sheet.save(path)


def _image_config(workdir: Path, corpus: Path, options: dict[str, object]) -> TrainConfig:
    """The image run's config: training/recipes/demo-image.json, then the command line's
    ``options`` (model, epochs, batch_size; None keeps the recipe's), this corpus and a run
    folder named for the model."""
    import json

    from training.recipes import load_train_config, recipe_path

    overrides = [
        f"{key}={json.dumps(value)}" for key, value in options.items() if value is not None
    ]
    overrides.append(f"data.train={json.dumps(str(corpus / 'images.csv'))}")
    config = load_train_config(recipe_path("demo-image"), overrides)
    return config.model_copy(update={"output": workdir / "runs" / config.model})


def _train(config: TrainConfig, quiet: bool) -> dict:
    """Train the default model on the corpus; a finished run is reused, an interrupted one
    resumes from its checkpoint."""
    import json

    from training.train import train

    results = config.output / "results.json"
    if results.is_file():
        click.echo(f"[2/6] train: reusing {config.output}")
        return json.loads(results.read_text())["evals"]
    click.echo(
        f"[2/6] train: {config.model} with the {config.objective.kind} objective, "
        f"{config.epochs} epochs (resumes if interrupted)"
    )
    return train(config, resume=True, progress=not quiet).evals


def _video_fit(splits: dict[str, int]) -> dict[str, object] | None:
    """What training/recipes/demo-video.json needs changed for the corpus's video splits (a batch
    no larger than the train clips, no val split when there is none); None (and a note) when
    there are too few clips to train and test a video model."""
    from training.recipes import read_recipe, recipe_path

    train, test = splits.get("train", 0), splits.get("test", 0)
    if train < 2 or test < 1:
        click.echo(
            f"[2/6] train video: skipped ({train} train and {test} test clips); videos are "
            "embedded as the mean of their frames' image embeddings"
        )
        return None
    batch_size = int(read_recipe(recipe_path("demo-video"))["batch_size"])
    fit: dict[str, object] = {"batch_size": min(batch_size, train)}
    if not splits.get("val"):
        fit["data.val_split"] = None
    return fit


def _video_config(
    workdir: Path, corpus: Path, image_config: TrainConfig, fit: dict[str, object]
) -> TrainConfig:
    """The video run's config: training/recipes/demo-video.json (the temporal video model on the
    image run's towers, see its _note), fitted to the corpus (:func:`_video_fit`); its towers
    are built as the image run's (model and image stem), since it starts from them."""
    import json

    from training.recipes import load_train_config, recipe_path

    model_name = image_config.model
    settings = {
        **fit,
        "model": model_name,
        "image_stem": image_config.image_stem,
        "data.train": str(corpus / "videos.csv"),
        "init_from": str(image_config.output / "checkpoint.pt"),
        "objective.text_anchor.captions": str(corpus / "images.csv"),
        "output": str(workdir / "runs" / f"{model_name}-video"),
    }
    overrides = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
    return load_train_config(recipe_path("demo-video"), overrides)


def _train_video(config: TrainConfig, quiet: bool) -> dict:
    """Train the temporal video model from the image run's towers; reused when finished."""
    import json

    from training.train import train

    results = config.output / "results.json"
    if results.is_file():
        click.echo(f"[2/6] train video: reusing {config.output}")
        return json.loads(results.read_text())["evals"]
    click.echo(
        f"[2/6] train video: temporal pooling over {config.video.frames} frames on the image "
        f"run's towers (frozen: {', '.join(config.freeze) or 'none'}), {config.epochs} epochs"
    )
    return train(config, resume=True, progress=not quiet).evals


def _image_metrics_of(run: Path, image_run: Path) -> dict:
    """Image retrieval (test with the scene-query check, and heldout) of ``run``'s towers on
    the image run's splits: the figures of what the bundle serves. Cached in ``run``."""
    import json

    import torch

    from model.config import TrainConfig
    from training.checkpoint import load_checkpoint
    from training.eval_splits import (
        evaluate_checked,
        evaluate_loaded,
        load_named_split,
        towers_from_checkpoint,
    )

    cached = run / "image_evals.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    towers, _, state = towers_from_checkpoint(run / "checkpoint.pt")
    image_config = TrainConfig.model_validate(
        load_checkpoint(image_run / "checkpoint.pt")["train_config"]
    )
    context_length = int(state["context_length"])
    cpu = torch.device("cpu")
    evals = {}
    for name in ("test", "heldout"):
        split = load_named_split(image_config, name, context_length)
        evals[name] = (
            evaluate_checked(towers, image_config, split, context_length, cpu)
            if name == "test"
            else evaluate_loaded(towers, image_config, split, cpu)
        )
    cached.write_text(json.dumps(evals, indent=2))
    return evals


def _export(workdir: Path, run: Path, quiet: bool) -> Path:
    """Export the trained model; a bundle of the same checkpoint and step is reused."""
    from runtime.bundle import read_manifest
    from runtime.errors import BundleError
    from training.checkpoint import load_checkpoint
    from training.export import ExportOptions, export_bundle

    checkpoint = run / "checkpoint.pt"
    bundle = workdir / "bundle"
    step = int(load_checkpoint(checkpoint)["step"])
    try:
        source = read_manifest(bundle).source
        if source.get("step") == step and source.get("checkpoint") == str(checkpoint):
            click.echo(f"[3/6] export: reusing {bundle}")
            return bundle
    except BundleError:
        pass
    click.echo(f"[3/6] export: ONNX model bundle of {run.name} step {step}, checked against torch")
    export_bundle(checkpoint, bundle, ExportOptions(overwrite=True, progress=not quiet))
    return bundle


def _search_sample(bundle: Path, samples: list) -> None:
    """Text-to-image search over the contact sheet's images with the torch-free runtime."""
    from runtime.encoder import Encoder

    encoder = Encoder(bundle)
    images = encoder.encode_images([sample.image for sample in samples])
    texts = encoder.encode_texts([sample.captions[0] for sample in samples])
    best = (texts @ images.T).argmax(axis=1)
    hits = int((best == range(len(samples))).sum())
    click.echo(
        f"      runtime search (ONNX, no torch): {hits}/{len(samples)} sample captions find "
        f"their own image first among the {len(samples)}; e.g. {samples[0].captions[0]!r}"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("cots-demo"),
    show_default=True,
    help="Where the demo keeps its corpus and artefacts; reused by later runs.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Corpus seed.")
@click.option("--n-images", type=int, default=10_000, show_default=True, help="Corpus images.")
@click.option("--n-videos", type=int, default=1_000, show_default=True, help="Corpus videos.")
@click.option(
    "--model",
    "model_name",
    help="Model config to train (default: the demo-image recipe's, cots-tiny-p16).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    help="Training epochs (default: the demo-image recipe's, 16).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    help="Training batch size (default: the demo-image recipe's, 128).",
)
@click.option(
    "--videos/--no-videos",
    default=True,
    show_default=True,
    help="Train the temporal video model after the image model (--no-videos: videos are "
    "embedded as the mean of their frames' image embeddings).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--serve/--no-serve",
    default=True,
    show_default=True,
    help="Serve the page and API at the end (--no-serve: stop after the build steps).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to serve on.")
def demo(
    workdir: Path,
    seed: int,
    n_images: int,
    n_videos: int,
    model_name: str | None,
    epochs: int | None,
    batch_size: int | None,
    videos: bool,
    quiet: bool,
    serve: bool,
    host: str,
    port: int,
) -> None:
    """Build the demo on the embedded synthetic corpus, reusing finished steps, and serve it.

    Renders the corpus, trains the default CPU model with the COTS objective (about eleven
    minutes on two cores) and the temporal video model on its towers (about two), reports
    Recall@K on the test split and on the held-out colour-shape combinations, exports the
    ONNX model bundle, builds the image, caption and video collections (FAISS + SQLite), runs
    example queries, and serves the search page and API at http://HOST:PORT/ until Ctrl-C.
    Offline; a second run reuses every finished step.
    """
    import time

    from cots.demo_serve import build_indices, example_queries, serve_demo

    started = time.monotonic()
    from model.data.readers import CsvImageReader
    from training.evaluate import format_metrics

    corpus = workdir / "corpus"
    description = _synthesise(
        corpus, {"seed": seed, "n_images": n_images, "n_videos": n_videos}, quiet
    )
    reader = CsvImageReader(corpus / description["images"]["csv"], split="test")
    samples = list(islice(reader.samples(), 12))
    sheet = workdir / "sample.png"
    _contact_sheet(samples, sheet)
    click.echo(f"      contact sheet of {len(samples)} test images: {sheet}")

    train_started = time.monotonic()
    options: dict[str, object] = {"model": model_name, "epochs": epochs, "batch_size": batch_size}
    image_config = _image_config(workdir, corpus, options)
    evals = _train(image_config, quiet)
    click.echo(f"      image training: {time.monotonic() - train_started:.0f} s")
    click.echo("      results (Recall@K in %, Karpathy protocol):")
    for split in ("test", "heldout"):
        if split in evals:
            click.echo("  " + format_metrics(split, evals[split]))
    run = image_config.output
    video_fit = _video_fit(description["videos"]["splits"]) if videos else None
    if video_fit is not None:
        train_started = time.monotonic()
        video_config = _video_config(workdir, corpus, image_config, video_fit)
        run, video_evals = video_config.output, _train_video(video_config, quiet)
        click.echo(f"      video training: {time.monotonic() - train_started:.0f} s")
        click.echo("  " + format_metrics("videos test", video_evals["test"]))
        # The bundle's towers are the video run's: these are the images it finds (its text
        # tower is held to the image run's embeddings of the image captions).
        served = _image_metrics_of(run, image_config.output)
        click.echo("      images, with the exported bundle's towers (the video run's):")
        for split in ("test", "heldout"):
            click.echo("  " + format_metrics(split, served[split]))
    bundle = _export(workdir, run, quiet)
    _search_sample(bundle, samples)
    indices = build_indices(workdir, corpus, bundle, quiet)
    queries = example_queries(bundle, indices, corpus, samples)
    click.echo(
        f"corpus: {corpus} ({description['images']['count']:,} images, "
        f"{description['videos']['count']:,} videos); model: {image_config.output}; "
        f"bundle: {bundle}; collections: {indices}"
    )
    click.echo(f"build steps done in {time.monotonic() - started:.0f} s")
    click.echo(
        "your own photos and videos (README, 'Your own photos'), with an open_clip model's "
        "weights file:\n" + "\n".join(f"  {command}" for command in OWN_PHOTOS_COMMANDS)
    )
    if serve:
        serve_demo(bundle, indices, corpus, host, port, queries)
