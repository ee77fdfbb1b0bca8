"""``cots train-tokenizer``: train the visual tokenizer on a corpus and report its quality."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from model.config import DataConfig, PreprocessConfig
from model.data.readers import load_image
from model.data.records import CorpusError
from model.errors import ModelError
from model.preprocess import to_tensor_batch
from model.training_data import csv_reader
from model.visual_tokenizer import (
    TokenizerConfig,
    VisualTokenizer,
    codebook_stats,
    load_tokenizer,
    save_tokenizer,
)


def _images(data: DataConfig, split: str | None, size: int) -> torch.Tensor:
    try:
        records = list(csv_reader(data, split).records())
    except CorpusError as error:
        raise ModelError(str(error)) from None
    if not records:
        raise ModelError(f"no images in {data.train} for split {split!r}")
    preprocess = PreprocessConfig(image_size=size)
    return to_tensor_batch([load_image(r) for r in records], preprocess)


@torch.no_grad()
def evaluate_tokenizer(tokenizer: VisualTokenizer, images: torch.Tensor) -> dict[str, float]:
    tokenizer.eval()
    ids = torch.cat([tokenizer.encode(images[i : i + 256]) for i in range(0, len(images), 256)])
    mse = (
        sum(
            float(((tokenizer.decode(ids[i : i + 256]) - images[i : i + 256]) ** 2).sum())
            for i in range(0, len(images), 256)
        )
        / images.numel()
    )
    return {"reconstruction_mse": mse, **codebook_stats(ids, tokenizer.config.codebook_size)}


@click.command("train-tokenizer", context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--codebook-size", type=int, default=512, show_default=True, help="Number of codes.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Adam learning rate.")
@click.option(
    "--pretrained",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Start from this tokenizer file instead of random weights.",
)
@click.option("--seed", type=int, default=0, show_default=True)
def train_tokenizer(
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
    torch.manual_seed(seed)
    try:
        tokenizer = (
            load_tokenizer(pretrained).train()
            if pretrained
            else VisualTokenizer(
                TokenizerConfig(
                    image_size=image_size, patch_size=patch_size, codebook_size=codebook_size
                )
            )
        )
        config = DataConfig(train=data)
        train_images = _images(config, "train", tokenizer.config.image_size)
        val_images = _images(config, "val", tokenizer.config.image_size)
    except ModelError as error:
        raise click.ClickException(str(error)) from None
    optimiser = torch.optim.Adam(tokenizer.parameters(), lr=lr)
    started = time.perf_counter()
    from tqdm import tqdm

    steps = epochs * max(1, len(train_images) // batch_size)
    bar = tqdm(total=steps, desc="tokenizer", unit="step")
    for _ in range(epochs):
        tokenizer.train()
        order = torch.randperm(len(train_images))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            _, loss, _ = tokenizer(train_images[order[i : i + batch_size]])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            bar.update()
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    bar.close()
    metrics = {
        **evaluate_tokenizer(tokenizer, val_images),
        "train_s": time.perf_counter() - started,
    }
    save_tokenizer(tokenizer, out, metrics)
    click.echo(json.dumps(metrics, indent=2))
