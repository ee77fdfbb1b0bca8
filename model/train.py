"""``cots train``: one training run, single process or under ``torchrun`` (DDP).

Read top to bottom: set-up (device, data, model, objective, optimiser, schedule), resume, then
the loop: forward, objective, backward (with accumulation), step, log, checkpoint, evaluate.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from model.checkpoint import config_differences, load_checkpoint, save_checkpoint
from model.config import TrainConfig
from model.distributed import DistInfo, cleanup, init_distributed
from model.errors import ModelError
from model.evaluate import evaluate, format_metrics
from model.factory import create_towers, model_config
from model.objectives import OnlineModel, build_objective
from model.training_data import CaptionedImages, EpochBatches, PairDataset, collate, load_split

logger = logging.getLogger("cots.train")
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


@dataclass
class RunResult:
    step: int
    output: Path
    evals: dict[str, dict[str, float]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)


def resolve_image_size(config: TrainConfig) -> TrainConfig:
    """Fill preprocess.image_size from the model; refuse a size the model was not built for."""
    image_size = int(model_config(config.model)["vision_cfg"]["image_size"])
    wanted = config.preprocess.image_size
    if wanted is not None and wanted != image_size:
        raise ModelError(
            f"preprocess.image_size {wanted} differs from the image size {image_size} of model "
            f"{config.model}"
        )
    preprocess = config.preprocess.model_copy(update={"image_size": image_size})
    return config.model_copy(update={"preprocess": preprocess})


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on gains, biases, embeddings' positions and the temperature."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or "positional_embedding" in name or "class_embedding" in name
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class MetricsLog:
    """Appends JSON lines on rank 0 only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def train(
    config: TrainConfig,
    *,
    resume: bool = True,
    stop_after_steps: int | None = None,
    progress: bool = True,
) -> RunResult:
    """Train per ``config``; with ``resume``, continue from ``output/checkpoint.pt`` if present.

    ``stop_after_steps`` ends the run early without changing the schedule, as a kill would.
    """
    device = pick_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    dist = init_distributed(device)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    try:
        return _train(config, dist, device, resume, stop_after_steps, progress)
    finally:
        cleanup(dist)


def _train(
    config: TrainConfig,
    dist: DistInfo,
    device: torch.device,
    resume: bool,
    stop_after_steps: int | None,
    progress: bool,
) -> RunResult:
    torch.manual_seed(config.seed + dist.rank)
    output = Path(config.output)
    if dist.is_master:
        output.mkdir(parents=True, exist_ok=True)
    context_length = int(model_config(config.model)["text_cfg"].get("context_length", 77))
    config = resolve_image_size(config)

    # Data
    train_split = load_split(
        config.data,
        config.data.train_split,
        context_length,
        noise_fraction=config.data.noise_fraction,
        seed=config.seed,
    )
    val_split = (
        load_split(config.data, config.data.val_split, context_length)
        if config.data.val_split
        else None
    )
    sampler = EpochBatches(
        [len(t) for t in train_split.tokens],
        config.batch_size,
        config.seed,
        dist.rank,
        dist.world_size,
    )
    loader = DataLoader(
        PairDataset(train_split, config.preprocess),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=config.data.workers,
    )
    micro_per_epoch = len(sampler)
    steps_per_epoch = max(1, micro_per_epoch // config.accum_steps)
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    # Model, objective, optimiser, schedule
    towers = create_towers(config.model, config.pretrained)
    online = OnlineModel(towers, config.objective).to(device)
    objective = build_objective(online, config.objective, dist).to(device)
    model: torch.nn.Module = online
    if dist.enabled:
        model = DistributedDataParallel(
            online, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.AdamW(param_groups(online, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.warmup_steps, total_steps)
    )

    step = 0
    checkpoint_path = output / CHECKPOINT
    if resume and checkpoint_path.is_file():
        step = _restore(checkpoint_path, config, online, objective, optimizer, scheduler)
        logger.info("resumed from %s at step %d", checkpoint_path, step)
    elif dist.is_master:
        (output / METRICS).unlink(missing_ok=True)
    log = MetricsLog(output / METRICS, dist.is_master)
    result = RunResult(step=step, output=output)

    def state() -> dict[str, Any]:
        return {
            "model_name": config.model,
            "model_config": model_config(config.model),
            "train_config": config.model_dump(mode="json"),
            "preprocess": config.preprocess.model_dump(mode="json"),
            "context_length": context_length,
            "model": online.state_dict(),
            "objective": objective.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "rng": torch.get_rng_state(),
            "evals": result.evals,
        }

    bar = tqdm(
        total=total_steps,
        initial=step,
        desc="train",
        unit="step",
        disable=not (progress and dist.is_master),
    )
    last_time, samples_since = time.perf_counter(), 0
    use_bf16 = config.precision == "bf16" and device.type == "cuda"
    while step < total_steps and (stop_after_steps is None or step < stop_after_steps):
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch, start_batch=offset * config.accum_steps)
        model.train()
        micro = 0
        for images, tokens, groups, noisy in loader:
            images, tokens, groups, noisy = (
                t.to(device, non_blocking=True) for t in (images, tokens, groups, noisy)
            )
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                features = model(images, tokens)
                out = objective(
                    features, groups, online=online, images=images, tokens=tokens, noisy=noisy
                )
            (out.loss / config.accum_steps).backward()
            micro += 1
            samples_since += len(groups) * dist.world_size
            if micro % config.accum_steps:
                continue
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.losses.append(out.parts["loss"])
            bar.update()
            if step % config.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "epoch": epoch,
                    "lr": scheduler.get_last_lr()[0],
                    **out.parts,
                    "samples_per_s": samples_since / (now - last_time),
                }
                last_time, samples_since = now, 0
                log.write(record)
                bar.set_postfix(loss=f"{out.parts['loss']:.3f}")
            if dist.is_master and (step % config.checkpoint_every == 0 or step == total_steps):
                save_checkpoint(checkpoint_path, state())
            if step >= total_steps or (stop_after_steps is not None and step >= stop_after_steps):
                break
            if micro // config.accum_steps >= steps_per_epoch:
                break
        epoch_done = step % steps_per_epoch == 0 or step >= total_steps
        if epoch_done and val_split is not None and config.eval_every_epoch and dist.is_master:
            _evaluate_into(result, "val", val_split, online, config, device, log, step)
            save_checkpoint(checkpoint_path, state())
    bar.close()

    if step >= total_steps and dist.is_master:
        for name in config.data.eval_splits:
            split = load_split(config.data, name, context_length)
            _evaluate_into(result, name, split, online, config, device, log, step)
        save_checkpoint(checkpoint_path, state())
        (output / "results.json").write_text(
            json.dumps({"step": step, "evals": result.evals}, indent=2)
        )
    result.step = step
    return result


def _evaluate_into(
    result: RunResult,
    name: str,
    split: CaptionedImages,
    online: OnlineModel,
    config: TrainConfig,
    device: torch.device,
    log: MetricsLog,
    step: int,
) -> None:
    metrics = evaluate(online.towers, split, config.preprocess, device)
    result.evals[name] = metrics
    log.write({"step": step, "eval": name, **metrics})
    tqdm.write(f"step {step} " + format_metrics(name, metrics))


def _restore(
    path: Path,
    config: TrainConfig,
    online: OnlineModel,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    state = load_checkpoint(path)
    differences = config_differences(state["train_config"], config.model_dump(mode="json"))
    if differences:
        raise ModelError(
            f"{path} was written by another config; start a new output folder or pass "
            "--no-resume. Differences: " + "; ".join(differences)
        )
    online.load_state_dict(state["model"])
    objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])
