"""``cots train-visual-tokenizer``: train the visual (VQ) tokenizer of
``model/visual_tokenizer.py`` on a corpus and report its quality. (The text tokenizer, a BPE,
is ``model/tokenizer.py``.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from model.config import DataConfig, PreprocessConfig
from model.data.records import CorpusError
from model.errors import ModelError
from model.preprocess import to_tensor_batch
from model.visual_tokenizer import (
    TokenizerConfig,
    VisualTokenizer,
    codebook_stats,
    load_tokenizer,
    save_tokenizer,
)
from training.training_data import csv_reader

_EVAL_BATCH = 256


def _images(data: DataConfig, split: str | None, size: int) -> torch.Tensor:
    """Every image of a split, decoded once; unreadable files are skipped and reported, as in
    training."""
    try:
        images = [sample.image for sample in csv_reader(data, split).samples()]
    except CorpusError as error:
        raise ModelError(str(error)) from None
    if not images:
        raise ModelError(f"no usable images in {data.train} for split {split!r}")
    return to_tensor_batch(images, PreprocessConfig(image_size=size))


@torch.no_grad()
def evaluate_tokenizer(
    tokenizer: VisualTokenizer, images: torch.Tensor, mean_image: torch.Tensor | None = None
) -> dict[str, float]:
    """Reconstruction MSE (normalised pixels) through the codes, codebook usage/perplexity, and
    ``baseline_mse``: the error of predicting ``mean_image`` (by default the mean of ``images``)
    for every image, the score of a tokenizer that learned nothing."""
    tokenizer.eval()
    ids, squared = [], 0.0
    for i in range(0, len(images), _EVAL_BATCH):
        batch = images[i : i + _EVAL_BATCH]
        ids.append(tokenizer.encode(batch))
        squared += float(((tokenizer.decode(ids[-1]) - batch) ** 2).sum())
    mean = images.mean(0) if mean_image is None else mean_image
    return {
        "reconstruction_mse": squared / images.numel(),
        "baseline_mse": float(((images - mean) ** 2).mean()),
        **codebook_stats(torch.cat(ids), tokenizer.config.codebook_size),
    }


def fit_tokenizer(
    data: DataConfig,
    tokenizer_config: TokenizerConfig,
    *,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    pretrained: Path | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> tuple[VisualTokenizer, dict[str, float]]:
    """Train a tokenizer on the "train" split of ``data`` and score it on the "val" split.

    With ``pretrained``, training continues from that file and its own config replaces
    ``tokenizer_config``. The same seed gives the same tokenizer (on the same thread count).
    Returns the tokenizer (in eval mode) and the val metrics of :func:`evaluate_tokenizer` plus
    ``train_s``, the wall time of the training loop.

    ``threads`` caps torch's CPU threads while this runs (``None``: leave them be). One is the
    default because the model is small: a second thread gains under 10% on an idle machine,
    and when another process holds a core each step waits on its time slices, 5x slower.
    """
    if epochs < 1 or batch_size < 1:
        raise ModelError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _fit(data, tokenizer_config, epochs, batch_size, lr, seed, pretrained, progress)
    finally:
        torch.set_num_threads(previous)


def _fit(
    data: DataConfig,
    tokenizer_config: TokenizerConfig,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    pretrained: Path | None,
    progress: bool,
) -> tuple[VisualTokenizer, dict[str, float]]:
    torch.manual_seed(seed)
    tokenizer = (
        load_tokenizer(pretrained).train() if pretrained else VisualTokenizer(tokenizer_config)
    )
    size = tokenizer.config.image_size
    train_images = _images(data, "train", size)
    val_images = _images(data, "val", size)
    # a batch larger than the split would train on nothing
    batch_size = min(batch_size, len(train_images))
    optimiser = torch.optim.Adam(tokenizer.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train_images) // batch_size
    from tqdm import tqdm

    started = time.perf_counter()
    with tqdm(
        total=epochs * steps_per_epoch, desc="tokenizer", unit="step", disable=not progress
    ) as bar:
        for _ in range(epochs):
            tokenizer.train()
            order = torch.randperm(len(train_images), generator=generator)
            for step in range(steps_per_epoch):
                batch = train_images[order[step * batch_size : (step + 1) * batch_size]]
                _, loss, _ = tokenizer(batch)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                bar.update()
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    train_s = time.perf_counter() - started
    metrics = evaluate_tokenizer(tokenizer, val_images, train_images.mean(0))
    return tokenizer.eval(), {**metrics, "train_s": train_s}


@click.command("train-visual-tokenizer", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Image CSV (filepath,caption[,image_id,split]).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the tokenizer (.pt, loads with weights_only=True).",
)
@click.option(
    "--image-size",
    type=int,
    default=64,
    show_default=True,
    help="Image side; must match the model the tokenizer serves.",
)
@click.option(
    "--patch-size",
    type=int,
    default=8,
    show_default=True,
    help="Patch side of the image tower: one code per patch.",
)
@click.option(
    "--codebook-size",
    type=int,
    default=TokenizerConfig.codebook_size,
    show_default=True,
    help="Number of codes.",
)
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Adam learning rate.")
@click.option(
    "--pretrained",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Start from this tokenizer file instead of random weights.",
)
@click.option("--seed", type=int, default=0, show_default=True)
def train_visual_tokenizer(
    data: Path,
    out: Path,
    image_size: int,
    patch_size: int,
    codebook_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    pretrained: Path | None,
    seed: int,
) -> None:
    """Train the VQ visual tokenizer on the train split; report reconstruction error (MSE on
    normalised pixels) and codebook usage/perplexity on the val split."""
    try:
        config = TokenizerConfig(
            image_size=image_size, patch_size=patch_size, codebook_size=codebook_size
        )
        tokenizer, metrics = fit_tokenizer(
            DataConfig(train=data),
            config,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            pretrained=pretrained,
        )
        save_tokenizer(tokenizer, out, metrics)
    except ModelError as error:
        raise click.ClickException(str(error)) from None
    click.echo(json.dumps(metrics, indent=2))
