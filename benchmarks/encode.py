"""``cots bench encode``: query and corpus encoding speed, torch vs the ONNX runtime.

The model is a training checkpoint (``--checkpoint``) or any open_clip model with its weights
(``--model ViT-B-32 --pretrained FILE``, exported zero-shot; speed does not depend on the
values, so random weights measure a real model's cost). Texts/s include tokenising (open_clip's
tokenizer for torch, ``tokenizer.json`` for the runtime), because that is what a text query
costs; they are measured on the split's captions, on texts of exactly 16 tokens (a typed
query) and on texts that fill the context. Images/s are the model alone, on pixels
preprocessed beforehand: decoding and resizing cost the same on both sides. Batch 1 is a
query; batch 64 is indexing. int8 (dynamic quantisation) is only worth offering if retrieval
stays within a point, so every variant is evaluated on the split, and each variant's
embeddings are compared with ONNX fp32's (mean cosine over the split's images and captions).
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
QUERY_TOKENS = 16  # a typed query, start and end of text included
# Text sets: the split's captions, 16-token queries, texts as long as the context.
TEXT_SETS = ("captions", "16 tok", "full")


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
    help="checkpoint.pt of the torch model (or --model with --pretrained).",
)
@click.option("--model", "model_name", help="An open_clip model, e.g. ViT-B-32 (zero-shot).")
@click.option("--pretrained", help="Its open_clip tag or weights file (with --model).")
@click.option(
    "--bundle",
    type=click.Path(file_okay=False, path_type=Path),
    help="Its model bundle (default: exported into a temporary folder).",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Corpus CSV with a split column (default: the checkpoint's; needed with --model).",
)
@click.option("--split", default="test", show_default=True, help="Split to evaluate recall on.")
@click.option("--int8", is_flag=True, help="Also measure int8 dynamic quantisation.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results as JSON here.",
)
def encode_bench(
    checkpoint: Path | None,
    model_name: str | None,
    pretrained: str | None,
    bundle: Path | None,
    data: Path | None,
    split: str,
    int8: bool,
    threads: int,
    json_out: Path | None,
) -> None:
    """Texts/s and images/s at batch 1 and 64 for the torch model and the ONNX runtime (fp32,
    and int8 with --int8), each one's recall on a split, and its embeddings' cosine with ONNX
    fp32's. Texts: the split's captions, 16-token queries and texts that fill the context."""
    import torch

    from model.errors import ModelError
    from runtime.encoder import Encoder
    from runtime.errors import BundleError
    from training.eval_splits import load_named_split

    if (checkpoint is None) == (model_name is None or pretrained is None):
        raise click.UsageError("give --checkpoint, or --model with --pretrained (not both)")
    if checkpoint is None and data is None:
        raise click.UsageError("--model needs --data: a corpus CSV to measure and evaluate on")
    torch.set_num_threads(threads)
    try:
        towers, config, context_length = _towers(checkpoint, model_name, pretrained, data)
        if config.data.modality != "image":
            raise ModelError("cots bench encode measures image models; this one is for videos")
        test = load_named_split(config, split, context_length)
        with tempfile.TemporaryDirectory() as scratch:
            if bundle is None:
                bundle = Path(scratch) / "bundle"
                _export(checkpoint, model_name, pretrained, bundle, int8, config.data.train)
            variants: dict[str, Any] = {"torch fp32": _TorchSide(towers, config, context_length)}
            for precision in ("fp32", "int8") if int8 else ("fp32",):
                runtime = Encoder(bundle, providers=["cpu"], precision=precision, threads=threads)
                variants[f"onnx {precision}"] = _RuntimeSide(runtime)
            corpus = _Corpus.of(test, context_length)
            measured = [_measure(name, side, corpus) for name, side in tqdm(variants.items())]
    except (ModelError, BundleError) as error:
        raise click.ClickException(str(error)) from None
    rows = _with_cosines(measured)
    _report(rows, config.model, threads, split, json_out)


def _towers(
    checkpoint: Path | None, model_name: str | None, pretrained: str | None, data: Path | None
) -> tuple[Any, Any, int]:
    """(towers, config, context length) of a checkpoint or of an open_clip model's weights."""
    from model.config import DataConfig
    from training.eval_splits import towers_from_checkpoint
    from training.zero_shot import pretrained_model

    if checkpoint is not None:
        towers, config, state = towers_from_checkpoint(checkpoint)
        if data is not None:
            config.data.train = data
        return towers, config, int(state["context_length"])
    assert model_name is not None
    assert pretrained is not None
    assert data is not None
    model = pretrained_model(model_name, pretrained, corpus=data)
    config = model.config.model_copy(update={"data": DataConfig(train=data)})
    return model.towers, config, model.context_length


def _export(
    checkpoint: Path | None,
    model_name: str | None,
    pretrained: str | None,
    bundle: Path,
    int8: bool,
    corpus: Path,
) -> None:
    from training.export import ExportOptions, export_bundle, export_pretrained

    options = ExportOptions(int8=int8, corpus=corpus)
    if checkpoint is not None:
        export_bundle(checkpoint, bundle, options)
    else:
        assert model_name is not None
        assert pretrained is not None
        export_pretrained(model_name, pretrained, bundle, options)


class _TorchSide:
    def __init__(self, towers: Any, config: Any, context_length: int) -> None:
        self.towers, self.config = towers, config
        self.context_length = context_length

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
        from runtime.images import preprocess_images

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
    texts: dict[str, list[str]]  # TEXT_SETS -> texts
    image_groups: Any  # torch [N]
    caption_groups: Any  # torch [M]

    @classmethod
    def of(cls, split: Any, context_length: int) -> _Corpus:
        from model.data.readers import load_image
        from training.evaluate import caption_groups

        captions = [caption for captions in split.captions for caption in captions]
        return cls(
            images=[load_image(record) for record in split.records],
            captions=captions,
            texts={
                "captions": captions,
                "16 tok": _texts_of_length(captions, min(QUERY_TOKENS, context_length)),
                "full": _texts_of_length(captions, context_length),
            },
            image_groups=split.groups,
            caption_groups=caption_groups(split.groups, split.captions),
        )


def _texts_of_length(captions: list[str], tokens: int, count: int = 256) -> list[str]:
    """``count`` texts of exactly ``tokens`` ids with open_clip's BPE (start and end of text
    included), each made of the words of consecutive captions."""
    from model.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(tokens)
    words = " ".join(captions).split()
    texts = []
    for start in range(min(count, len(words))):
        text: list[str] = []
        i = start
        while len(tokenizer.encode(" ".join(text))) < tokens - 2:
            text.append(words[i % len(words)])
            i += 1
        ids = tokenizer.encode(" ".join(text))[: tokens - 2]
        texts.append(tokenizer.decode(ids).strip())
    return texts


def _measure(name: str, side: Any, corpus: _Corpus) -> dict[str, Any]:
    import torch

    from training.evaluate import retrieval_metrics

    captions = corpus.captions
    pixels = side.pixels(corpus.images)
    row: dict[str, Any] = {"variant": name}
    for batch in BATCHES:
        for text_set, texts in corpus.texts.items():
            key = "texts_per_s" if text_set == "captions" else f"texts_per_s[{text_set}]"
            row[f"{key}@{batch}"] = _throughput(side.encode_texts, texts, batch)
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
    row["embeddings"] = (image_emb, text_emb)
    return row


def _with_cosines(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's mean cosine with ONNX fp32's embeddings, per modality (the embeddings
    themselves are dropped)."""
    reference = next(r["embeddings"] for r in rows if r["variant"] == "onnx fp32")
    out = []
    for row in rows:
        embeddings = row.pop("embeddings")
        for modality, mine, theirs in zip(("image", "text"), embeddings, reference, strict=True):
            row[f"{modality}_cosine_vs_onnx_fp32"] = float(np.mean(np.sum(mine * theirs, axis=1)))
        out.append(row)
    return out


def _columns() -> list[tuple[str, str]]:
    """(header, row key) of the throughput columns."""
    columns = []
    for text_set in TEXT_SETS:
        key = "texts_per_s" if text_set == "captions" else f"texts_per_s[{text_set}]"
        columns += [(f"texts/s {text_set} @{b}", f"{key}@{b}") for b in BATCHES]
    return columns + [(f"images/s @{b}", f"images_per_s@{b}") for b in BATCHES]


def _report(
    rows: list[dict[str, Any]], model: str, threads: int, split: str, json_out: Path | None
) -> None:
    cpu = platform.processor() or platform.machine()
    click.echo(
        f"model {model}, {threads} threads, {cpu}; recall on the {split} split; "
        f"texts: the split's captions, {QUERY_TOKENS}-token queries, texts filling the context"
    )
    columns = _columns()
    header = [h for h, _ in columns] + ["t2i R@1", "mean recall", "cos image", "cos text"]
    click.echo("| variant | " + " | ".join(header) + " |")
    click.echo("|---" * (len(header) + 1) + "|")
    for row in rows:
        cells = [f"{row[key]:.0f}" for _, key in columns]
        cells += [f"{row['t2i_R@1']:.1f}", f"{row['mean_recall']:.1f}"]
        cells += [f"{row[f'{m}_cosine_vs_onnx_fp32']:.4f}" for m in ("image", "text")]
        click.echo(f"| {row['variant']} | " + " | ".join(cells) + " |")
    click.echo("(cos: mean cosine of the variant's embeddings with ONNX fp32's on the split)")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"model": model, "threads": threads, "split": split, "cpu": cpu}
        json_out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
