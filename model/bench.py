"""``cots bench train``: the cost of COTS's momentum machinery as a measured ratio.

Each objective runs in its own process, so peak memory is that objective's alone. Inputs are
random tensors of the model's shapes, so the numbers measure the model and objective, not
data loading.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

WORKER = "model.bench"


def _measure(
    model_name: str,
    objective_kind: str,
    batch_size: int,
    steps: int,
    warmup: int,
    threads: int | None,
    queue_size: int,
) -> dict[str, Any]:
    """Runs in a fresh process: build, warm up, time ``steps`` optimiser steps."""
    import torch

    from model.config import ObjectiveConfig
    from model.distributed import DistInfo
    from model.factory import create_towers, model_config
    from model.objectives import OnlineModel, build_objective

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = model_config(model_name)
    image_size = config["vision_cfg"]["image_size"]
    context = config["text_cfg"].get("context_length", 77)
    objective_config = ObjectiveConfig(kind=objective_kind, queue_size=queue_size)  # type: ignore[arg-type]
    online = OnlineModel(create_towers(model_name), objective_config).to(device)
    objective = build_objective(online, objective_config, DistInfo()).to(device)
    optimizer = torch.optim.AdamW(online.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    tokens = torch.randint(1, 49000, (batch_size, context), generator=generator)
    tokens[:, -1] = 49407  # end-of-text, which the text tower pools on
    tokens = tokens.to(device)
    groups = torch.arange(batch_size, device=device)

    def step(offset: int) -> None:
        features = online(images, tokens)
        out = objective(
            features, groups + offset * batch_size, online=online, images=images, tokens=tokens
        )
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
        "objective": objective_kind,
        "model": model_name,
        "device": str(device),
        "batch_size": batch_size,
        "steps": steps,
        "samples_per_s": batch_size * steps / elapsed,
        "step_ms": 1000 * elapsed / steps,
        "peak_rss_mb": peak_rss,
        "model_rss_mb": peak_rss - rss_before,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "threads": torch.get_num_threads(),
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
    default="clip,cots",
    show_default=True,
    help="Comma-separated objectives to compare; the first is the reference.",
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
    json_out: Path | None,
) -> None:
    """Training throughput (samples/s) and peak memory of each objective on the same model.

    Prints a markdown table with the ratio of each objective's samples/s to the first one's.
    """
    rows = []
    for kind in [k.strip() for k in objectives.split(",") if k.strip()]:
        args = {
            "model_name": model_name,
            "objective_kind": kind,
            "batch_size": batch_size,
            "steps": steps,
            "warmup": warmup,
            "threads": threads,
            "queue_size": queue_size,
        }
        result = subprocess.run(
            [sys.executable, "-m", WORKER, json.dumps(args)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise click.ClickException(f"benchmark of {kind} failed:\n{result.stderr[-2000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    reference = rows[0]["samples_per_s"]
    cpu = platform.processor() or platform.machine()
    click.echo(
        f"model {model_name}, batch {batch_size}, {steps} timed steps, "
        f"{rows[0]['device']}, {rows[0]['threads']} threads, {cpu}"
    )
    click.echo(
        "| objective | samples/s | step ms | ratio vs first | peak RSS MB "
        "| model+step RSS MB | peak GPU MB |"
    )
    click.echo("|---|---|---|---|---|---|---|")
    for row in rows:
        gpu = f"{row['peak_gpu_mb']:.0f}" if row["peak_gpu_mb"] is not None else "-"
        click.echo(
            f"| {row['objective']} | {row['samples_per_s']:.1f} | {row['step_ms']:.0f} | "
            f"{row['samples_per_s'] / reference:.2f} | {row['peak_rss_mb']:.0f} | "
            f"{row['model_rss_mb']:.0f} | {gpu} |"
        )
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    print(json.dumps(_measure(**json.loads(sys.argv[1]))))
