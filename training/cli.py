"""``cots train`` and ``cots eval``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

_CONFIG_HELP = """Settings are a JSON file or recipe (--config) plus overrides
(--set key.sub=value, JSON values), then the shortcut options, last wins. Sections: model,
pretrained, objective (kind cots|clip, momentum, queue_size, temperature, kl_weight,
filter.{enabled,alpha,ema,warmup_steps}), data
(train CSV, splits, column names, noise_fraction, workers), preprocess, and the optimiser and
loop settings (epochs, max_steps, batch_size, accum_steps, lr, weight_decay, warmup_steps,
precision fp32|bf16, device, threads, log_every, checkpoint_every)."""


def _checkpoint_option(
    required: bool = True, help: str = "checkpoint.pt written by cots train."
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--checkpoint",
        type=click.Path(dir_okay=False, path_type=Path),
        required=required,
        help=help,
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=_CONFIG_HELP)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON training config, or a shipped recipe's name (training/recipes/: demo-image, "
    "demo-video, quality/01-clip-baseline, ...); keys starting with _ are notes.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override one setting, e.g. --set objective.kind=clip (repeatable).",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Training CSV (filepath,caption[,image_id,split]); shortcut for data.train.",
)
@click.option(
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder: checkpoint.pt, metrics.jsonl, results.json.",
)
@click.option("--model", "model_name", help="open_clip model config, e.g. cots-tiny or ViT-B-32.")
@click.option("--pretrained", help="open_clip pretrained tag or local checkpoint file.")
@click.option("--objective", type=click.Choice(["cots", "clip"]), help="Training objective.")
@click.option("--epochs", type=click.IntRange(min=1), help="Epochs over the train split.")
@click.option(
    "--max-steps", type=click.IntRange(min=1), help="Stop after this many optimiser steps."
)
@click.option(
    "--resume/--no-resume",
    default=True,
    show_default=True,
    help="Continue from OUTPUT/checkpoint.pt when it exists.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(
    config_path: Path | None,
    overrides: tuple[str, ...],
    data: Path | None,
    output: Path | None,
    model_name: str | None,
    pretrained: str | None,
    objective: str | None,
    epochs: int | None,
    max_steps: int | None,
    resume: bool,
    quiet: bool,
) -> None:
    """Train the two-tower model (COTS or the CLIP baseline) on an image-caption corpus.

    Runs in one process, or under torchrun for DDP (e.g. `torchrun --nproc_per_node 2 -m
    cots.cli train ...`). Evaluates on the val split each epoch and on the test and heldout
    splits at the end; checkpoints hold everything needed to resume exactly.
    """
    from model.errors import ModelError
    from training.recipes import load_train_config
    from training.train import train as run

    shortcuts = {
        "data.train": data,
        "output": output,
        "model": model_name,
        "pretrained": pretrained,
        "objective.kind": objective,
        "epochs": epochs,
        "max_steps": max_steps,
    }
    extra = [
        f"{k}={json.dumps(str(v) if isinstance(v, Path) else v)}"
        for k, v in shortcuts.items()
        if v is not None
    ]
    try:
        config = load_train_config(config_path, [*overrides, *extra])
        result = run(config, resume=resume, progress=not quiet)
    except ModelError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"finished at step {result.step}; results in {result.output}")


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@_checkpoint_option()
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV to evaluate on (default: the training config's data.train).",
)
@click.option(
    "--split",
    "splits",
    multiple=True,
    default=("test", "heldout"),
    show_default=True,
    help="Split(s) to evaluate (repeatable).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def evaluate(checkpoint: Path, data: Path | None, splits: tuple[str, ...], as_json: bool) -> None:
    """Recall@1/5/10 (text->image and image->text, or text->video and video->text for a video
    run), mean recall and median rank; image runs add image->image and text->text.

    Several captions per image are handled as in the Karpathy protocol: a caption is right when
    its image ranks high; an image is right when any of its captions does.
    """
    import torch

    from model.errors import ModelError
    from training.eval_splits import evaluate_loaded, load_named_split, towers_from_checkpoint
    from training.evaluate import format_metrics

    try:
        towers, config, state = towers_from_checkpoint(checkpoint)
        if data is not None:
            config.data.train = data
        results = {}
        for split in splits:
            loaded = load_named_split(config, split, int(state["context_length"]))
            results[split] = evaluate_loaded(towers, config, loaded, torch.device("cpu"))
    except ModelError as error:
        raise click.ClickException(str(error)) from None
    if as_json:
        click.echo(json.dumps(results, indent=2))
    else:
        for split, metrics in results.items():
            medians = "  ".join(
                f"{key} {value:.0f}" for key, value in metrics.items() if key.endswith("_medr")
            )
            click.echo(f"{format_metrics(split, metrics)}  {medians}")


@click.command("export", context_settings={"help_option_names": ["-h", "--help"]})
@_checkpoint_option(
    required=False,
    help="checkpoint.pt written by cots train (or give --model and --pretrained instead).",
)
@click.option(
    "--model",
    "model_name",
    help="Zero-shot export: an open_clip model name (e.g. ViT-B-32), with --pretrained.",
)
@click.option(
    "--pretrained",
    help="Zero-shot export: an open_clip pretrained tag (needs a network or open_clip's cache) "
    "or a local weights file, loaded with weights_only=True.",
)
@click.option(
    "--tokenizer",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Zero-shot export: the model's tokenizer.json, for models whose tokenizer is not "
    "open_clip's BPE (SigLIP's comes from a model hub); shipped as given.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Bundle folder to write (image.onnx, text.onnx, video.onnx, tokenizer.json, ...).",
)
@click.option("--opset", type=click.IntRange(min=17), default=18, show_default=True)
@click.option(
    "--fp16/--no-fp16", default=True, show_default=True, help="Also write fp16 copies (GPU)."
)
@click.option("--int8", is_flag=True, help="Also write int8 (dynamic quantisation) copies.")
@click.option(
    "--corpus",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV whose items the parity check uses (default: the checkpoint's training CSV).",
)
@click.option(
    "--check-items",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Corpus items compared between torch and ONNX Runtime.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def export(
    checkpoint: Path | None,
    model_name: str | None,
    pretrained: str | None,
    tokenizer: Path | None,
    out: Path,
    opset: int,
    fp16: bool,
    int8: bool,
    corpus: Path | None,
    check_items: int,
    force: bool,
    quiet: bool,
) -> None:
    """Export a checkpoint, or an open_clip model's pretrained weights as they are (zero-shot:
    --model ViT-B-32 --pretrained FILE), to a model bundle that serving runs without torch.

    Writes the three ONNX models (dynamic batch; the text model also takes any length up to
    the context length), tokenizer.json and bundle.json. Before anything is written to OUT,
    the bundle is loaded by the serving runtime and its embeddings are compared with the torch
    model's, on random inputs and on corpus items; the export fails if the cosine similarity
    drops below 0.9999 (fp32) or 0.999 (fp16). A zero-shot export takes the preprocessing
    and context length of the model and its weights, and checks on corpus items only with
    --corpus.
    """
    from model.errors import ModelError
    from runtime.bundle import read_manifest
    from training.export import ExportOptions, export_bundle, export_pretrained

    zero_shot = model_name is not None or pretrained is not None or tokenizer is not None
    if checkpoint is not None and zero_shot:
        raise click.UsageError("give --checkpoint, or --model with --pretrained, not both")
    if checkpoint is None and (model_name is None or pretrained is None):
        raise click.UsageError(
            "give --checkpoint (a trained run) or --model and --pretrained (zero-shot)"
        )

    options = ExportOptions(
        opset=opset,
        fp16=fp16,
        int8=int8,
        corpus=corpus,
        check_items=check_items,
        overwrite=force,
        progress=not quiet,
    )
    try:
        if checkpoint is not None:
            export_bundle(checkpoint, out, options)
        else:
            assert model_name is not None
            assert pretrained is not None
            export_pretrained(model_name, pretrained, out, options, tokenizer)
    except ModelError as error:
        raise click.ClickException(str(error)) from None
    manifest = read_manifest(out)
    click.echo(f"bundle {manifest.short_id} written to {out}")
    for name in sorted(manifest.files):
        click.echo(f"  {name:24s} {(out / name).stat().st_size / 1e6:8.1f} MB")
    worst = min(manifest.checks.items(), key=lambda item: item[1])
    click.echo(f"parity: {len(manifest.checks)} checks, lowest cosine {worst[1]:.7f} ({worst[0]})")
