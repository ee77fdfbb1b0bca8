"""``cots train``: one training run, single process or under ``torchrun`` (DDP).

Read top to bottom: set-up (device, data, model, objective, optimiser, schedule), resume, then
the loop: forward, objective, backward (with accumulation), step, log, checkpoint, evaluate.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from model.aux_inputs import make_aux_inputs, mlm_corpus_vocab
from model.config import TrainConfig
from model.data.records import CorpusError
from model.distributed import DistInfo, cleanup, init_distributed
from model.errors import ModelError
from model.factory import Towers, build_towers, model_config
from model.new_words import NO_WEIGHT_DECAY, learn_only_new_words
from model.objectives import LossOutput, OnlineModel, build_objective, report_diagnostics
from model.tokenizer import tokenize
from model.visual_tokenizer import VisualTokenizer, load_tokenizer
from model.word_head import word_vocabulary
from training.checkpoint import config_differences, load_checkpoint, save_checkpoint
from training.eval_splits import (
    Split,
    evaluate_checked,
    evaluate_loaded,
    load_named_split,
    towers_state,
)
from training.evaluate import format_metrics
from training.negative_images import negative_image_twins, twin_coverage
from training.training_data import (
    CaptionNegatives,
    EpochBatches,
    PairDataset,
    collate,
    colour_keys,
    csv_reader,
    load_split,
)
from training.video_data import VideoPairDataset, load_video_split

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
    """Fill preprocess.image_size from the model; refuse a size the model was not built for,
    and a model whose text tower needs another tokenizer than the one training uses."""
    open_clip_config = model_config(config.model)
    hub_tokenizer = open_clip_config.get("text_cfg", {}).get("hf_tokenizer_name")
    if hub_tokenizer:
        raise ModelError(
            f"training tokenises with open_clip's BPE, but {config.model} reads ids of the "
            f"tokenizer {hub_tokenizer!r}; fine-tune a model with CLIP's text tower, or export "
            "this one zero-shot (cots export --model ... --tokenizer FILE)"
        )
    image_size = int(open_clip_config["vision_cfg"]["image_size"])
    wanted = config.preprocess.image_size
    if wanted is not None and wanted != image_size:
        raise ModelError(
            f"preprocess.image_size {wanted} differs from the image size {image_size} of model "
            f"{config.model}"
        )
    preprocess = config.preprocess.model_copy(update={"image_size": image_size})
    return config.model_copy(update={"preprocess": preprocess})


# The device types whose torch AdamW has a fused implementation.
FUSED_ADAMW_DEVICES: Final = ("cpu", "cuda")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# The towers' own weights: what --pretrained loads (the COOKIE head and video pooling are new).
_PRETRAINED_PREFIXES = ("towers.visual.", "towers.text.")


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr: float, pretrained_lr: float | None = None
) -> list[dict[str, Any]]:
    """No weight decay on gains, biases, embeddings' positions, the temperature and parameters
    marked ``NO_WEIGHT_DECAY`` (model/new_words.py); with
    ``pretrained_lr``, the towers' own weights learn at that rate, the rest at ``lr``."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = (
            param.ndim < 2
            or "positional_embedding" in name
            or "class_embedding" in name
            or getattr(param, NO_WEIGHT_DECAY, False)
        )
        pretrained = pretrained_lr is not None and name.startswith(_PRETRAINED_PREFIXES)
        groups.setdefault((pretrained, skip), []).append(param)
    return [
        {
            "params": params,
            "weight_decay": 0.0 if skip else weight_decay,
            "lr": pretrained_lr if pretrained and pretrained_lr is not None else lr,
        }
        for (pretrained, skip), params in sorted(groups.items())
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


@dataclass
class _Run:
    """What one training run holds: built once by :func:`_build_run`, then stepped."""

    config: TrainConfig
    dist: DistInfo
    device: torch.device
    context_length: int
    val_split: Split | None
    sampler: EpochBatches
    loader: DataLoader
    steps_per_epoch: int
    total_steps: int
    online: OnlineModel
    objective: torch.nn.Module
    model: torch.nn.Module  # the online model, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    log: MetricsLog
    result: RunResult
    step: int = 0

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        return self.online.towers.patch_grid if self.config.objective.masked.mvm_weight else None

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.config.output) / CHECKPOINT

    def save(self) -> None:
        if not self.dist.is_master:
            return
        save_checkpoint(
            self.checkpoint_path,
            {
                "model_name": self.config.model,
                "model_config": model_config(self.config.model),
                "train_config": self.config.model_dump(mode="json"),
                "preprocess": self.config.preprocess.model_dump(mode="json"),
                "context_length": self.context_length,
                "model": self.online.state_dict(),
                "objective": self.objective.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "step": self.step,
                "rng": torch.get_rng_state(),
                "evals": self.result.evals,
            },
        )

    def evaluate(self, name: str, split: Split, checks: bool = False) -> None:
        """Retrieval metrics; with ``checks``, also the scene-query check (images of a
        synthetic corpus) and the binding check (images), or the time-order and direction
        checks (videos)."""
        towers = self.online.towers
        metrics = (
            evaluate_checked(towers, self.config, split, self.context_length, self.device)
            if checks
            else evaluate_loaded(towers, self.config, split, self.device)
        )
        self.result.evals[name] = metrics
        self.log.write({"step": self.step, "eval": name, **metrics})
        tqdm.write(f"step {self.step} " + format_metrics(name, metrics))


def _build_run(
    config: TrainConfig, dist: DistInfo, device: torch.device, resume: bool, progress: bool
) -> _Run:
    """Data, model, objective, optimiser and schedule; restored from the checkpoint if asked
    (``progress``: the bars of loading, such as video decoding)."""
    torch.manual_seed(config.seed + dist.rank)
    output = Path(config.output)
    if dist.is_master:
        output.mkdir(parents=True, exist_ok=True)
    context_length = int(model_config(config.model)["text_cfg"].get("context_length", 77))
    config = resolve_image_size(config)

    data = config.data
    train_split, dataset = _training_pairs(config, context_length, progress)
    val_split = (
        load_named_split(config, data.val_split, context_length, progress)
        if data.val_split
        else None
    )
    sampler = EpochBatches(
        [len(t) for t in train_split.tokens],
        config.batch_size,
        config.seed,
        dist.rank,
        dist.world_size,
        negative_draws=_hard_negatives_on(config),
        similar=colour_keys(train_split.captions) if _similar_batches_on(config) else None,
        similar_share=config.objective.hard_negatives.similar_share,
        twins=_negative_image_twins(config, train_split.captions, dataset),
        twin_share=config.objective.hard_negatives.image_share,
    )
    # Workers are spawned, not forked (DataLoader's default on Linux): a fork would copy this
    # process's threads, locks and signal handlers into them (see docs/decisions.md).
    worker_options: dict[str, Any] = (
        {"multiprocessing_context": "spawn", "persistent_workers": True} if data.workers else {}
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=data.workers,
        **worker_options,
    )
    steps_per_epoch = max(1, len(sampler) // config.accum_steps)
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    towers = build_towers(config)
    if config.init_from is not None:
        _init_towers(towers, Path(config.init_from), config.image_stem)
    _freeze(towers, config.freeze)
    _learn_new_words(towers, config, context_length)
    tokenizer = _visual_tokenizer(config, towers)
    codebook_size = tokenizer.config.codebook_size if tokenizer else None
    masked = config.objective.masked
    # MLM among the words the training captions use: every masked word is one of them
    corpus = masked.mlm_weight > 0 and masked.mlm_vocab == "corpus"
    mlm_vocab = mlm_corpus_vocab(train_split.tokens) if corpus else None
    words = config.objective.word_prediction.weight > 0
    bigrams = config.objective.word_prediction.bigrams
    word_vocab = word_vocabulary(train_split.tokens, bigrams) if words else None
    online = OnlineModel(towers, config.objective, codebook_size, mlm_vocab, word_vocab)
    online = online.to(device)
    objective_steps = total_steps * config.accum_steps  # the objective runs per micro-batch
    objective = build_objective(
        online,
        config.objective,
        dist,
        tokenizer,
        objective_steps,
        _anchor_tokens(config, context_length),
    ).to(device)
    model: torch.nn.Module = online
    if dist.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(online, device_ids=device_ids)
    scaled = config.pretrained is not None and config.pretrained_lr_scale != 1.0
    pretrained_lr = config.lr * config.pretrained_lr_scale if scaled else None
    # Fused: one kernel over all parameters. On the CPU the default loops per tensor, and
    # with the token embedding (49k x 128, most of a tiny model's weights) the optimiser step
    # cost 61.6 ms looped, 33.1 foreach and 7.2 fused at one thread (docs/results.md).
    optimizer = torch.optim.AdamW(
        param_groups(online, config.weight_decay, config.lr, pretrained_lr),
        lr=config.lr,
        fused=device.type in FUSED_ADAMW_DEVICES,
    )
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
    return _Run(
        config=config,
        dist=dist,
        device=device,
        context_length=context_length,
        val_split=val_split,
        sampler=sampler,
        loader=loader,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        online=online,
        objective=objective,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        log=MetricsLog(output / METRICS, dist.is_master),
        result=RunResult(step=step, output=output),
        step=step,
    )


def _training_pairs(
    config: TrainConfig, context_length: int, progress: bool
) -> tuple[Split, Dataset]:
    data = config.data
    noise, seed = data.noise_fraction, config.seed
    if data.modality == "video":
        videos = load_video_split(
            data,
            data.train_split,
            context_length,
            config.preprocess,
            decode_frames=config.video.decode_frames,
            noise_fraction=noise,
            seed=seed,
            progress=progress,
        )
        pairs = VideoPairDataset(
            videos,
            config.preprocess,
            config.video.frames,
            negatives=_caption_negatives(config),
            reverse_share=config.video.reverse_share,
        )
        if config.video.reverse_share > 0:
            # a user's captions may name no change the word lists can turn around
            logger.info(
                "reversed clips: %.0f %% of the training captions can be turned around in time, "
                "and their clips are played backwards %.0f %% of the time",
                100 * pairs.reversible_share,
                100 * config.video.reverse_share,
            )
        return videos, pairs
    images = load_split(
        data,
        data.train_split,
        context_length,
        noise_fraction=noise,
        seed=seed,
        preprocess=config.preprocess,
        partial_captions=data.partial_captions,
    )
    return images, PairDataset(images, config.preprocess, _caption_negatives(config))


def _similar_batches_on(config: TrainConfig) -> bool:
    negatives = config.objective.hard_negatives
    return negatives.enabled and negatives.similar_share > 0 and config.data.modality == "image"


def _negative_image_twins(
    config: TrainConfig, captions: Sequence[Sequence[str]], dataset: Dataset
) -> list[list[int]] | None:
    """Per training item, its hard negative images (training/negative_images.py), when the
    run gives them a share of its batches; found with the dataset's own negatives picker, so
    each caption's negatives are written once."""
    negatives = getattr(dataset, "negatives", None)
    if config.objective.hard_negatives.image_share == 0 or not isinstance(
        negatives, CaptionNegatives
    ):
        return None
    twins = negative_image_twins(captions, negatives)
    logger.info(
        "hard negative images: %.0f %% of the training images have one",
        100 * twin_coverage(twins),
    )
    return twins


def _hard_negatives_on(config: TrainConfig) -> bool:
    return config.objective.hard_negatives.enabled


def _caption_negatives(config: TrainConfig) -> CaptionNegatives | None:
    """The picker of the training captions' hard negatives, when the objective has them."""
    return CaptionNegatives(config.objective.hard_negatives) if _hard_negatives_on(config) else None


def _init_towers(towers: torch.nn.Module, path: Path, image_stem: str) -> None:
    """Start from another run's towers; parts that run did not have (a temporal model, a
    COOKIE head) keep their fresh initialisation."""
    try:
        checkpoint = load_checkpoint(path)
        state = towers_state(checkpoint["model"])
    except ModelError as error:
        raise ModelError(f"init_from: {error}") from None
    stem = checkpoint.get("train_config", {}).get("image_stem", "patch")
    if stem != image_stem:
        raise ModelError(
            f"init_from {path}: its image tower has the {stem!r} stem and this run's the "
            f"{image_stem!r} one; set image_stem={json.dumps(stem)}"
        )
    try:
        missing, unexpected = towers.load_state_dict(state, strict=False)
    except RuntimeError as error:
        raise ModelError(f"init_from {path}: towers do not match: {error}") from None
    if unexpected:
        raise ModelError(f"init_from {path}: parameters this model lacks: {unexpected[:5]}")
    logger.info("towers from %s (%d parameters kept fresh: %s)", path, len(missing), missing[:5])


def _anchor_tokens(config: TrainConfig, context_length: int) -> torch.Tensor | None:
    """Tokens of the text anchor's captions (the train split of its CSV), or None."""
    anchor = config.objective.text_anchor
    if anchor.weight <= 0 or anchor.captions is None:
        return None
    return _csv_caption_tokens(config, anchor.captions, context_length, "text_anchor.captions")


def _csv_caption_tokens(
    config: TrainConfig, csv: Path, context_length: int, setting: str
) -> torch.Tensor:
    """Tokens of the captions of an image-caption CSV's train split (``setting`` names the
    option that gave the CSV, for errors)."""
    data = config.data.model_copy(update={"train": csv, "group_key": "image_id"})
    try:
        records = list(csv_reader(data, data.train_split or None).records())
    except CorpusError as error:
        raise ModelError(f"{setting}: {error}") from None
    captions = [c for record in records for c in record.captions]
    if not captions:
        raise ModelError(f"{setting}: no captions in {csv}")
    return tokenize(captions, context_length)


def _freeze(towers: Towers, parts: Sequence[str]) -> None:
    """Frozen towers get no gradient (and so no optimiser state): their forward pass builds no
    graph, which also makes the step cheaper."""
    modules = {"image": towers.visual, "text": towers.text}
    for part in parts:
        modules[part].requires_grad_(False)
    if parts:
        logger.info("frozen towers: %s", ", ".join(parts))


def _learn_new_words(towers: Towers, config: TrainConfig, context_length: int) -> None:
    """With ``learn_new_words``, the frozen text tower's token embeddings learn again, but only
    for ids the given captions never use (model/new_words.py)."""
    if config.learn_new_words is None:
        return
    seen = _csv_caption_tokens(config, config.learn_new_words, context_length, "learn_new_words")
    learned = learn_only_new_words(towers, seen)
    logger.info("text tower frozen but for the embeddings of %d unseen token ids", learned)


def _visual_tokenizer(config: TrainConfig, towers: Towers) -> VisualTokenizer | None:
    masked = config.objective.masked
    if masked.mvm_weight <= 0 or masked.visual_tokenizer is None:
        return None
    tokenizer = load_tokenizer(Path(masked.visual_tokenizer))
    if tokenizer.grid != towers.patch_grid:
        raise ModelError(
            f"visual tokenizer {masked.visual_tokenizer} has a {tokenizer.grid} patch grid, the "
            f"image tower {towers.patch_grid}: train it with the model's image and patch size"
        )
    return tokenizer


def _aux_generator(config: TrainConfig, step: int, micro: int) -> torch.Generator:
    """Seeded by (seed, step, micro-batch): resumed runs mask and augment identically."""
    return torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 64 + micro)


class _Throughput:
    """Samples per second between two log lines."""

    def __init__(self) -> None:
        self.since, self.samples = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.samples += n

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.samples / max(now - self.since, 1e-9)
        self.since, self.samples = now, 0
        return rate


@dataclass(frozen=True)
class StepInputs:
    """One micro-batch: images (or frames), token ids, group ids (the same group: positives of
    each other) and, on a corpus with injected noise, which pairs are noisy (for the filter's
    recall and precision only)."""

    images: torch.Tensor
    tokens: torch.Tensor
    groups: torch.Tensor
    noisy: torch.Tensor | None = None
    negatives: torch.Tensor | None = None  # [B, L] hard negative captions' ids; 0 rows: none


def negative_tokens(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """[B, L] token ids of a batch's hard negative captions; all zeros where a caption has
    none (""), the objectives' mark of an absent negative."""
    tokens = tokenize(texts, context_length)
    tokens[torch.tensor([not text for text in texts], dtype=torch.bool)] = 0
    return tokens


def forward_loss(
    model: torch.nn.Module,
    objective: torch.nn.Module,
    config: TrainConfig,
    batch: StepInputs,
    *,
    patch_grid: tuple[int, int] | None,
    generator: torch.Generator,
) -> LossOutput:
    """A micro-batch's forward pass and objective, as training and ``cots bench train`` both
    run it: the masks drawn from ``generator``, the towers (``model``: the online model, or its
    DDP wrapper), then the loss. The caller owns backward, the optimiser and autocast."""
    online = model.module if isinstance(model, DistributedDataParallel) else model
    aux = make_aux_inputs(
        config.objective,
        batch.images,
        batch.tokens,
        patch_grid,
        generator,
        mlm_vocab=online.mlm_vocab if isinstance(online, OnlineModel) else None,
        negatives=batch.negatives,
    )
    features = model(batch.images, batch.tokens, aux)
    out: LossOutput = objective(
        features,
        batch.groups,
        online=online,
        images=batch.images,
        tokens=batch.tokens,
        noisy=batch.noisy,
        aux=aux,
    )
    return out


def _train_epoch(run: _Run, bar: tqdm, throughput: _Throughput, stop_at: int) -> None:
    """From the current step to the end of its epoch (or ``stop_at``): forward, objective,
    backward with accumulation, optimiser step, log, checkpoint."""
    config, device = run.config, run.device
    epoch, offset = divmod(run.step, run.steps_per_epoch)
    run.sampler.set_epoch(epoch, start_batch=offset * config.accum_steps)
    run.model.train()
    use_bf16 = config.precision == "bf16" and device.type == "cuda"
    micro = 0
    for batch in _epoch_batches(run.loader, resumed_inside=offset > 0):
        images, tokens, groups, noisy = (t.to(device, non_blocking=True) for t in batch[:4])
        negatives = negative_tokens(batch[4], run.context_length) if len(batch) > 4 else None
        negatives = negatives.to(device) if negatives is not None else None
        generator = _aux_generator(config, run.step, micro % config.accum_steps)
        # Diagnostics only for the micro-batch whose step is logged: the rest never reach a log.
        completes = (micro + 1) % config.accum_steps == 0
        logged = (run.step + 1) % config.log_every == 0 or run.step + 1 == run.total_steps
        report_diagnostics(run.objective, completes and logged)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = forward_loss(
                run.model,
                run.objective,
                config,
                StepInputs(images, tokens, groups, noisy, negatives),
                patch_grid=run.patch_grid,
                generator=generator,
            )
        (out.loss / config.accum_steps).backward()
        micro += 1
        throughput.add(len(groups) * run.dist.world_size)
        if micro % config.accum_steps:
            continue
        # The norm is logged either way: its spikes mark the steps where training goes wrong.
        grad_norm = torch.nn.utils.clip_grad_norm_(
            run.online.parameters(), config.grad_clip or math.inf
        )
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1
        run.result.losses.append(out.parts["loss"])
        bar.update()
        if run.step % config.log_every == 0 or run.step == run.total_steps:
            lr = run.scheduler.get_last_lr()[0]
            record = {
                "step": run.step,
                "epoch": epoch,
                "lr": lr,
                "grad_norm": float(grad_norm),
                **out.parts,
            }
            run.log.write({**record, "samples_per_s": throughput.take()})
            bar.set_postfix(loss=f"{out.parts['loss']:.3f}")
        if run.step % config.checkpoint_every == 0 or run.step == run.total_steps:
            run.save()
        if run.step >= stop_at or micro // config.accum_steps >= run.steps_per_epoch:
            return


def _epoch_batches(loader: DataLoader, resumed_inside: bool) -> Iterator[Any]:
    """The loader's batches. Starting its iterator draws worker seeds from torch's global
    generator; a run resumed inside an epoch has restored that generator as it stood after the
    epoch's own draw, so this start must leave it untouched, or the video frames (and reversed
    clips), which come from the same generator, would differ from an uninterrupted run's."""
    if not resumed_inside:
        return iter(loader)
    state = torch.get_rng_state()
    batches = iter(loader)
    torch.set_rng_state(state)
    return batches


def _train(
    config: TrainConfig,
    dist: DistInfo,
    device: torch.device,
    resume: bool,
    stop_after_steps: int | None,
    progress: bool,
) -> RunResult:
    run = _build_run(config, dist, device, resume, progress and dist.is_master)
    stop_at = min(run.total_steps, stop_after_steps or run.total_steps)
    bar = tqdm(
        total=run.total_steps,
        initial=run.step,
        desc="train",
        unit="step",
        disable=not (progress and dist.is_master),
    )
    throughput = _Throughput()
    while run.step < stop_at:
        _train_epoch(run, bar, throughput, stop_at)
        epoch_done = run.step % run.steps_per_epoch == 0 or run.step >= run.total_steps
        if epoch_done and run.val_split is not None and run.config.eval_every_epoch:
            if dist.is_master:
                run.evaluate("val", run.val_split)
            run.save()
    bar.close()

    if run.step >= run.total_steps and dist.is_master:
        for name in run.config.data.eval_splits:
            # The checks beyond recall run on the test split only.
            split = load_named_split(run.config, name, run.context_length, progress)
            run.evaluate(name, split, checks=name == "test")
        run.save()
        results = {"step": run.step, "evals": run.result.evals}
        (run.result.output / "results.json").write_text(json.dumps(results, indent=2))
    run.result.step = run.step
    return run.result


def _restore(
    path: Path,
    config: TrainConfig,
    online: OnlineModel,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> int:
    state = load_checkpoint(path)
    differences = config_differences(
        _with_defaults(state["train_config"]), config.model_dump(mode="json")
    )
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


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with the defaults of settings added since it was written, so a
    new setting left at its default does not block resuming; as saved if it no longer
    validates (then the differences name what changed)."""
    try:
        return TrainConfig.model_validate(saved).model_dump(mode="json")
    except ValueError:
        return saved
