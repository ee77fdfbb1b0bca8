"""``cots bench train``: the cost of COTS's machinery as measured ratios against CLIP.

Variants: the CLIP baseline, COTS (momentum towers, queues, KL), either with hard negative
captions (+hn: one per caption), COTS with them and the image tower's conv stem (+conv), and
with caption-word prediction from both embeddings too (+words), COTS with masked language
modeling (over the full vocabulary, and over the corpus's words: mlm_vocab corpus) and with
masked vision-language modeling (token level), CLIP with COOKIE's shared head and intra-modal
losses, and video training with either objective.

Each objective runs in its own process, so peak memory is that objective's alone. Inputs are
random tensors of the model's shapes, so the numbers measure the model and objective, not
data loading. With ``--corpus`` the token ids are a synthetic corpus's training captions
instead (real lengths and words), and the corpus-vocabulary MLM predicts among that split's
words, as training does; without it, among the ids the random batch uses.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

WORKER = "benchmarks.train"


# Each variant: training-config overrides on top of the model and the objective kind.
VARIANTS: dict[str, dict[str, Any]] = {
    "clip": {"objective": {"kind": "clip"}},
    "cots": {"objective": {"kind": "cots"}},
    "cots+mlm": {"objective": {"kind": "cots", "masked": {"mlm_weight": 1.0}}},
    "cots+mlm-corpus": {
        "objective": {"kind": "cots", "masked": {"mlm_weight": 1.0, "mlm_vocab": "corpus"}}
    },
    "cots+mvlm": {"objective": {"kind": "cots", "masked": {"mlm_weight": 1.0, "mvm_weight": 1.0}}},
    "clip+hn": {"objective": {"kind": "clip", "hard_negatives": {"enabled": True}}},
    "cots+hn": {"objective": {"kind": "cots", "hard_negatives": {"enabled": True}}},
    "cots+hn+conv": {
        "objective": {"kind": "cots", "hard_negatives": {"enabled": True}},
        "image_stem": "conv",
    },
    "cots+hn+conv+words": {
        "objective": {
            "kind": "cots",
            "hard_negatives": {"enabled": True},
            "word_prediction": {"weight": 1.0, "text": True},
        },
        "image_stem": "conv",
    },
    "clip+cookie": {
        "objective": {"kind": "clip", "intra": {"weight": 0.5}},
        "cookie": {"enabled": True},
    },
    "video-clip": {"objective": {"kind": "clip"}, "data": {"modality": "video"}},
    "video-cots": {"objective": {"kind": "cots"}, "data": {"modality": "video"}},
}


def _worker_env() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH, so ``python -m benchmarks.train``
    imports from any working directory (an editable install maps only the product packages)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root}


def _measure(
    model_name: str,
    variant: str,
    batch_size: int,
    steps: int,
    warmup: int,
    threads: int | None,
    queue_size: int,
    log_every: int = 1,
    corpus: str | None = None,
) -> dict[str, Any]:
    """Runs in a fresh process: build, warm up, time ``steps`` optimiser steps, the objective's
    diagnostics computed on every ``log_every``-th (as training computes them for its log).

    Video variants take ``batch_size / 4`` clips of 4 frames, so every variant pushes the
    same number of images through the image tower; their samples are clips.
    """
    import tempfile

    import torch

    from model.aux_inputs import mlm_corpus_vocab
    from model.clip_tokens import EOT_ID, SOT_ID
    from model.config import TrainConfig
    from model.distributed import DistInfo
    from model.factory import build_towers, model_config
    from model.objectives import OnlineModel, build_objective, report_diagnostics
    from model.tokenizer import tokenize
    from model.visual_tokenizer import TokenizerConfig, VisualTokenizer, save_tokenizer
    from model.word_head import word_vocabulary
    from training.train import FUSED_ADAMW_DEVICES, StepInputs, forward_loss, negative_tokens
    from training.training_data import CaptionNegatives, csv_reader

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = model_config(model_name)
    image_size = model["vision_cfg"]["image_size"]
    context = model["text_cfg"].get("context_length", 77)
    overrides = json.loads(json.dumps(VARIANTS[variant]))
    overrides["objective"]["queue_size"] = queue_size
    tokenizer = None
    if overrides["objective"].get("masked", {}).get("mvm_weight"):
        # an untrained tokenizer costs the same as a trained one
        tokenizer = VisualTokenizer(
            TokenizerConfig(image_size=image_size, patch_size=model["vision_cfg"]["patch_size"])
        )
        path = Path(tempfile.mkdtemp()) / "tokenizer.pt"
        save_tokenizer(tokenizer, path, {})
        overrides["objective"]["masked"]["tokenizer"] = str(path)
    config = TrainConfig.model_validate({"model": model_name, **overrides})
    generator = torch.Generator().manual_seed(0)
    video = config.data.modality == "video"
    frames = config.video.frames  # the video tower's clip length, which the model is built for
    samples = batch_size // frames if video else batch_size
    shape = (samples, frames) if video else (samples,)
    images = torch.randn(*shape, 3, image_size, image_size, generator=generator).to(device)
    if corpus is not None:
        # the training split's captions: the first ``samples`` are the batch (repeated if
        # fewer), all of them the corpus vocabulary, as training builds it
        data = config.data.model_copy(update={"train": Path(corpus) / "images.csv"})
        records = csv_reader(data, data.train_split or None).records()
        texts = [c for r in records for c in r.captions]
        split_tokens = tokenize(texts, context)
        tokens = split_tokens[torch.arange(samples) % len(split_tokens)]
        batch_texts = [texts[i % len(texts)] for i in range(samples)]
    else:
        tokens = torch.randint(1, 49000, (samples, context), generator=generator)
        tokens[:, 0] = SOT_ID
        tokens[:, -1] = EOT_ID
        split_tokens = tokens
        batch_texts = None
    negatives = None
    if config.objective.hard_negatives.enabled:
        # one negative per caption, as at fraction 1: the corpus's own swaps, else random ids
        if batch_texts is not None:
            picker = CaptionNegatives(config.objective.hard_negatives)
            draws = torch.rand(samples, generator=generator).tolist()
            picked = [picker.pick(t, d) for t, d in zip(batch_texts, draws, strict=True)]
            negatives = negative_tokens(picked, context).to(device)
        else:
            negatives = tokens[torch.randperm(samples, generator=generator)].to(device)
    masked = config.objective.masked
    corpus_vocab = masked.mlm_weight > 0 and masked.mlm_vocab == "corpus"
    online = OnlineModel(
        build_towers(config),
        config.objective,
        tokenizer.config.codebook_size if tokenizer else None,
        mlm_corpus_vocab([split_tokens]) if corpus_vocab else None,
        word_vocabulary([split_tokens]) if config.objective.word_prediction.weight > 0 else None,
    ).to(device)
    objective = build_objective(online, config.objective, DistInfo(), tokenizer).to(device)
    optimizer = torch.optim.AdamW(
        online.parameters(), lr=1e-4, fused=device.type in FUSED_ADAMW_DEVICES
    )
    tokens = tokens.to(device)
    groups = torch.arange(samples, device=device)
    grid = online.towers.patch_grid if tokenizer is not None else None

    def step(offset: int) -> None:
        report_diagnostics(objective, (offset + 1) % log_every == 0)
        batch = StepInputs(images, tokens, groups + offset * samples, negatives=negatives)
        out = forward_loss(online, objective, config, batch, patch_grid=grid, generator=generator)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "objective": variant if log_every == 1 else f"{variant}, log every {log_every}",
        "log_every": log_every,
        "model": model_name,
        "device": str(device),
        "batch_size": samples,
        "images_per_step": samples * frames if video else samples,
        "steps": steps,
        "samples_per_s": samples * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "peak_rss_mb": peak_rss,
        "model_rss_mb": peak_rss - rss_before,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
        "mlm_vocab": len(online.mlm_vocab) if online.mlm_vocab is not None else None,
        "tokens": "corpus" if corpus is not None else "random",
    }


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_name", default="cots-tiny", show_default=True, help="Model config.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=128,
    show_default=True,
    help="Pairs per step.",
)
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Timed optimiser steps per objective.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Untimed steps first.",
)
@click.option(
    "--queue-size",
    type=click.IntRange(min=0),
    default=4096,
    show_default=True,
    help="COTS queue size.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option(
    "--objectives",
    default=",".join(VARIANTS),
    show_default=True,
    help=f"Comma-separated variants to compare ({', '.join(VARIANTS)}); the first is the "
    "reference. Video variants use batch-size/4 clips of 4 frames.",
)
@click.option(
    "--log-every",
    default="1",
    show_default=True,
    help="Comma-separated: the objective computes its diagnostics every N steps, as training "
    "does for its log (log_every); each variant is measured at each value, side by side "
    "(1,10: diagnostics on every step against the training default).",
)
@click.option(
    "--corpus",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Synthetic corpus folder (cots data synth): the batch's token ids are its training "
    "captions and cots+mlm-corpus predicts among their words. Default: random token ids.",
)
@click.option(
    "--json-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results as JSON here.",
)
def train_bench(
    model_name: str,
    batch_size: int,
    steps: int,
    warmup: int,
    queue_size: int,
    threads: int | None,
    objectives: str,
    log_every: str,
    corpus: Path | None,
    json_out: Path | None,
) -> None:
    """Training throughput (samples/s) and peak memory of each objective on the same model.

    Prints a markdown table with the ratio of each objective's samples/s to the first one's.
    """
    rows = []
    kinds = [k.strip() for k in objectives.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in VARIANTS]
    if unknown or not kinds:
        raise click.BadParameter(
            f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}", param_hint="--objectives"
        )
    try:
        everies = [int(n) for n in log_every.split(",") if n.strip()]
    except ValueError:
        everies = []
    if not everies or min(everies) < 1:
        raise click.BadParameter(
            f"{log_every!r}: give positive integers, comma-separated", param_hint="--log-every"
        )
    runs = [(kind, every) for kind in kinds for every in everies]
    for kind, every in tqdm(runs, desc="variants", unit="variant"):
        args = {
            "model_name": model_name,
            "variant": kind,
            "batch_size": batch_size,
            "steps": steps,
            "warmup": warmup,
            "threads": threads,
            "queue_size": queue_size,
            "log_every": every,
            "corpus": str(corpus) if corpus is not None else None,
        }
        result = subprocess.run(
            [sys.executable, "-m", WORKER, json.dumps(args)],
            capture_output=True,
            text=True,
            env=_worker_env(),
        )
        if result.returncode != 0:
            raise click.ClickException(f"benchmark of {kind} failed:\n{result.stderr[-2000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    reference = rows[0]["samples_per_s"]
    cpu = platform.processor() or platform.machine()
    click.echo(
        f"model {model_name}, batch {batch_size}, {steps} timed steps, "
        f"{rows[0]['device']}, {rows[0]['threads']} threads, {cpu}, "
        + (f"tokens: the training captions of {corpus}" if corpus else "tokens: random ids")
    )
    click.echo(
        "| variant | pairs/step | images/step | samples/s | step ms | ratio vs first "
        "| peak RSS MB | model+step RSS MB | peak GPU MB |"
    )
    click.echo("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        gpu = f"{row['peak_gpu_mb']:.0f}" if row["peak_gpu_mb"] is not None else "-"
        click.echo(
            f"| {row['objective']} | {row['batch_size']} | {row['images_per_step']} | "
            f"{row['samples_per_s']:.1f} | {row['step_ms']:.0f} | "
            f"{row['samples_per_s'] / reference:.2f} | {row['peak_rss_mb']:.0f} | "
            f"{row['model_rss_mb']:.0f} | {gpu} |"
        )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    print(json.dumps(_measure(**json.loads(sys.argv[1]))))
