"""What the benches that read one trained run share: its --run and --corpus options, the
checkpoint a --run names, the run's towers over every image of its corpus (the demo's
``images`` collection), text embedding in batches, and the tables' markdown and JSON output
(querybank, scenes)."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import torch

F = TypeVar("F", bound=Callable[..., Any])


_OUT_HELP = "Also write the table here (markdown), and its figures beside it as .json."


def run_options(corpus_help: str) -> Callable[[F], F]:
    """--run (a run folder or checkpoint file), --corpus (default: the run's own), --threads
    and --out, in that order."""
    options = (
        click.option(
            "--run",
            "run",
            type=click.Path(exists=True, path_type=Path),
            required=True,
            help="A cots train run folder (its checkpoint.pt) or a checkpoint file.",
        ),
        click.option(
            "--corpus",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            default=None,
            help=f"{corpus_help} Default: the run's own.",
        ),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="torch threads."),
        click.option(
            "--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help=_OUT_HELP
        ),
    )

    def decorate(command: F) -> F:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def run_checkpoint(run: Path, threads: int | None) -> Path:
    """The checkpoint a --run names (a ClickException when its folder has none); sets the
    torch threads first."""
    if threads:
        torch.set_num_threads(threads)
    checkpoint = run / "checkpoint.pt" if run.is_dir() else run
    if not checkpoint.is_file():
        raise click.ClickException(f"{run}: no checkpoint.pt in this run folder")
    return checkpoint


@dataclass
class RunGallery:
    """A run's towers and every image of its corpus, all splits, embedded by them."""

    towers: Any
    context: int  # the text tower's context length
    corpus: Path
    data: Any  # the run's DataConfig, reading ``corpus``'s images.csv
    gallery: Any  # CaptionedImages of every split
    image_emb: torch.Tensor  # [N, D], L2-normalised
    config: Any  # the run's TrainConfig
    model_state: dict[str, Any]  # the checkpoint's raw model weights (heads the towers lack)


@torch.no_grad()
def load_run_gallery(checkpoint: Path, corpus: Path | None) -> RunGallery:
    """The run's towers over every image of ``corpus`` (None: the run's own corpus)."""
    from training.eval_splits import towers_from_checkpoint
    from training.evaluate import embed_split
    from training.training_data import load_split

    towers, config, state = towers_from_checkpoint(checkpoint)
    context = int(state["context_length"])
    corpus = Path(config.data.train).parent if corpus is None else corpus
    if not (corpus / "images.csv").is_file():
        raise click.ClickException(f"{corpus}: no images.csv")
    data = config.data.model_copy(update={"train": corpus / "images.csv"})
    gallery = load_split(data, None, context, preprocess=config.preprocess)
    image_emb = embed_split(towers, gallery, config.preprocess, torch.device("cpu"))[0]
    return RunGallery(towers, context, corpus, data, gallery, image_emb, config, state["model"])


@torch.no_grad()
def encode_texts(towers: Any, texts: list[str], context: int, batch: int = 512) -> torch.Tensor:
    """[len(texts), D] the text tower's L2-normalised embeddings, ``batch`` texts at a time."""
    from model.tokenizer import tokenize

    parts = [
        towers.encode_text(tokenize(texts[start : start + batch], context)).float()
        for start in range(0, len(texts), batch)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, 0)


def float_list(text: str, name: str, allow_zero: bool = False) -> list[float]:
    """A comma-separated option of numbers, each above 0 (or at least 0 with ``allow_zero``);
    click.BadParameter naming ``name`` otherwise."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or min(values) < 0 or (min(values) == 0 and not allow_zero):
        bound = "at least 0" if allow_zero else "above 0"
        raise click.BadParameter(f"each {name} must be {bound}: {text!r}")
    return values


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}), {torch.get_num_threads()} threads, torch {torch.__version__}"


def emit(text: str, measured: dict[str, Any], out: Path | None) -> None:
    """Print the table; with ``out``, also write it there and the figures beside it (.json)."""
    click.echo(text)
    if out is not None:
        out.write_text(text, encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(measured, indent=2), encoding="utf-8")
