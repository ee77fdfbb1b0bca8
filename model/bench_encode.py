"""``cots bench encode``: query and corpus encoding speed, torch vs the ONNX runtime.

Texts/s include tokenising (open_clip's tokenizer for torch, ``tokenizer.json`` for the
runtime), because that is what a text query costs. Images/s are the model alone, on pixels
preprocessed beforehand: decoding and resizing cost the same on both sides. Batch 1 is a
query; batch 64 is indexing. int8 (dynamic quantisation) is only worth offering if retrieval
stays within a point, so the benchmark also evaluates every variant on a test split.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from tqdm import tqdm

BATCHES = (1, 64)


def _throughput(run: Callable[[Any], object], items: Sequence[Any], batch: int) -> float:
    """Items per second of ``run`` over ``items`` in batches of ``batch`` (wrapping around when
    there are fewer items than a batch), after one warm-up batch, over at least 0.5 s."""
    count = len(items)
    batches = [
        _take(items, [(start + i) % count for i in range(batch)])
        for start in range(0, max(count, batch), batch)
    ]
    run(batches[0])
    done, start = 0, time.perf_counter()
    while True:
        for inputs in batches:
            run(inputs)
            done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= 0.5:
            return done / elapsed


def _take(items: Any, indices: list[int]) -> Any:
    if hasattr(items, "shape"):  # an array or tensor of prepared pixels
        return items[indices]
    return [items[i] for i in indices]


@click.command("encode", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="checkpoint.pt of the torch model.",
)
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    help="Its model bundle (default: exported from the checkpoint into a temporary folder).",
)
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), help="Corpus CSV.")
@click.option("--split", default="test", show_default=True, help="Split to evaluate recall on.")
@click.option("--int8", is_flag=True, help="Also measure int8 dynamic quantisation.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results as JSON here.",
)
def encode_bench(
    checkpoint: Path,
    bundle: Path | None,
    data: Path | None,
    split: str,
    int8: bool,
    threads: int,
    json_out: Path | None,
) -> None:
    """Texts/s and images/s at batch 1 and 64 for the torch model and the ONNX runtime (fp32,
    and int8 with --int8), and each one's recall on a split."""
    import torch

    from indexer.encoder import Encoder
    from indexer.errors import BundleError
    from model.errors import ModelError
    from model.eval_splits import load_named_split, towers_from_checkpoint
    from model.export import ExportOptions, export_bundle

    torch.set_num_threads(threads)
    try:
        towers, config, state = towers_from_checkpoint(checkpoint)
        if data is not None:
            config.data.train = data
        if config.data.modality != "image":
            raise ModelError("cots bench encode measures image models; this one is for videos")
        test = load_named_split(config, split, int(state["context_length"]))
        with tempfile.TemporaryDirectory() as scratch:
            if bundle is None:
                bundle = Path(scratch) / "bundle"
                options = ExportOptions(int8=int8, corpus=config.data.train)
                export_bundle(checkpoint, bundle, options)
            variants: dict[str, Any] = {"torch fp32": _TorchSide(towers, config, state)}
            for precision in ("fp32", "int8") if int8 else ("fp32",):
                runtime = Encoder(bundle, providers=["cpu"], precision=precision, threads=threads)
                variants[f"onnx {precision}"] = _RuntimeSide(runtime)
            corpus = _Corpus.of(test)
            rows = [_measure(name, side, corpus) for name, side in tqdm(variants.items())]
    except (ModelError, BundleError) as error:
        raise click.ClickException(str(error)) from None
    _report(rows, config.model, threads, split, json_out)


class _TorchSide:
    def __init__(self, towers: Any, config: Any, state: dict[str, Any]) -> None:
        self.towers, self.config = towers, config
        self.context_length = int(state["context_length"])

    def pixels(self, images: list[Any]) -> Any:
        from model.preprocess import to_tensor_batch

        return to_tensor_batch(images, self.config.preprocess)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        from model.tokenizer import tokenize

        with torch.no_grad():
            return self.towers.encode_text(tokenize(texts, self.context_length)).numpy()

    def encode_pixels(self, pixels: Any) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.towers.encode_image(pixels).numpy()


class _RuntimeSide:
    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def pixels(self, images: list[Any]) -> np.ndarray:
        from indexer.images import preprocess_images

        return preprocess_images(images, self.encoder.manifest.image)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_texts(texts)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self.encoder.run("image", pixels)


@dataclass(frozen=True)
class _Corpus:
    """The split, decoded once for every variant."""

    images: list[Any]
    captions: list[str]
    image_groups: Any  # torch [N]
    caption_groups: Any  # torch [M]

    @classmethod
    def of(cls, split: Any) -> _Corpus:
        from model.data.readers import load_image
        from model.evaluate import caption_groups

        return cls(
            images=[load_image(record) for record in split.records],
            captions=[caption for captions in split.captions for caption in captions],
            image_groups=split.groups,
            caption_groups=caption_groups(split.groups, split.captions),
        )


def _measure(name: str, side: Any, corpus: _Corpus) -> dict[str, Any]:
    import torch

    from model.evaluate import retrieval_metrics

    captions = corpus.captions
    pixels = side.pixels(corpus.images)
    row: dict[str, Any] = {"variant": name}
    for batch in BATCHES:
        row[f"texts_per_s@{batch}"] = _throughput(side.encode_texts, captions, batch)
        row[f"images_per_s@{batch}"] = _throughput(side.encode_pixels, pixels, batch)
    image_emb = np.concatenate(
        [side.encode_pixels(pixels[i : i + 64]) for i in range(0, len(pixels), 64)]
    )
    text_emb = np.concatenate(
        [side.encode_texts(captions[i : i + 64]) for i in range(0, len(captions), 64)]
    )
    metrics = retrieval_metrics(
        torch.from_numpy(image_emb),
        torch.from_numpy(text_emb),
        corpus.image_groups,
        corpus.caption_groups,
    )
    row["mean_recall"] = metrics["mean_recall"]
    row["t2i_R@1"] = metrics["t2i_R@1"]
    return row


def _report(
    rows: list[dict[str, Any]], model: str, threads: int, split: str, json_out: Path | None
) -> None:
    cpu = platform.processor() or platform.machine()
    click.echo(f"model {model}, {threads} threads, {cpu}; recall on the {split} split")
    header = [f"texts/s @{b}" for b in BATCHES] + [f"images/s @{b}" for b in BATCHES]
    click.echo("| variant | " + " | ".join(header) + " | t2i R@1 | mean recall |")
    click.echo("|---" * (len(header) + 3) + "|")
    for row in rows:
        cells = [f"{row[f'texts_per_s@{b}']:.0f}" for b in BATCHES]
        cells += [f"{row[f'images_per_s@{b}']:.0f}" for b in BATCHES]
        click.echo(
            f"| {row['variant']} | " + " | ".join(cells) + f" | {row['t2i_R@1']:.1f} | "
            f"{row['mean_recall']:.1f} |"
        )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": model, "threads": threads, "split": split, "cpu": cpu}
        json_out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
