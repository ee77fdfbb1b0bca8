"""``cots bench quality``: the ablation table, trained and evaluated by one command.

Every row trains the same model for the same number of steps on the same synthetic corpus,
then evaluates the test and held-out splits (never used for choices). Finished runs are kept
under ``--work`` and reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

DIRECTIONS = {"image": ("t2i", "i2t"), "video": ("t2v", "v2t")}
KS = (1, 5, 10)


@dataclass(frozen=True)
class Row:
    """One line of the table: config overrides on top of the shared base."""

    name: str
    overrides: dict[str, Any]
    main: bool = False  # main rows run with every seed, the others with the first only
    modality: str = "image"
    init_from: str | None = None  # the row (first seed) whose towers start this one
    needs_tokenizer: bool = False


def _load_rows() -> tuple[Row, ...]:
    """The rows, from training/recipes/quality/NN-*.json in table order: each file's ``_bench``
    note gives the row's name and kind, the rest of it is the row's config overrides (the
    same files ``cots train --config`` reads)."""
    from training.recipes import read_recipe, recipe_names, recipe_path, strip_notes

    rows = []
    for name in recipe_names():
        if name.startswith("quality/"):
            recipe = read_recipe(recipe_path(name))
            rows.append(Row(overrides=strip_notes(recipe), **recipe["_bench"]))
    return tuple(rows)


ROWS: tuple[Row, ...] = _load_rows()


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


@dataclass
class Plan:
    corpus: Path
    work: Path
    model: str
    steps: int
    batch_size: int
    video_batch_size: int
    video_steps: int
    seeds: tuple[int, ...]
    threads: int | None

    def run_dir(self, row: Row, seed: int) -> Path:
        return self.work / f"{_slug(row.name)}-seed{seed}"

    def config(self, row: Row, seed: int, tokenizer: Path | None) -> dict[str, Any]:
        base: dict[str, Any] = {
            "model": self.model,
            "seed": seed,
            "max_steps": self.video_steps if row.modality == "video" else self.steps,
            "batch_size": self.batch_size,
            "output": str(self.run_dir(row, seed)),
            "eval_every_epoch": False,
            "checkpoint_every": 20,
            "threads": self.threads,
            "data": {"train": str(self.corpus / "images.csv")},
            "objective": {"kind": "cots"},
        }
        if row.modality == "video":
            base["batch_size"] = self.video_batch_size
            base["data"] = {
                "modality": "video",
                "train": str(self.corpus / "videos.csv"),
                "group_key": "video_id",
                "eval_splits": ["test"],  # the synthetic corpus holds no held-out videos
            }
            base["objective"]["text_anchor"] = {"captions": str(self.corpus / "images.csv")}
        config = _merge(base, row.overrides)
        if row.needs_tokenizer:
            config = _merge(config, {"objective": {"masked": {"visual_tokenizer": str(tokenizer)}}})
        if row.init_from is not None:
            source = next(r for r in ROWS if r.name == row.init_from)
            config["init_from"] = str(self.run_dir(source, self.seeds[0]) / "checkpoint.pt")
        return config


def _ensure_corpus(corpus: Path) -> None:
    from model.data.synth import SynthConfig, generate_corpus

    if (corpus / "images.csv").is_file() and (corpus / "videos.csv").is_file():
        return
    click.echo(f"synthesising the default corpus into {corpus}")
    generate_corpus(corpus, SynthConfig(), progress=True)


def _ensure_tokenizer(plan: Plan) -> tuple[Path, dict[str, Any]]:
    import torch

    from model.config import DataConfig
    from model.factory import model_config
    from model.visual_tokenizer import TokenizerConfig, load_tokenizer, save_tokenizer
    from training.visual_tokenizer_train import fit_tokenizer

    path = plan.work / "visual-tokenizer.pt"
    metrics_path = path.with_suffix(".json")
    if path.is_file() and metrics_path.is_file():
        load_tokenizer(path)  # fails clearly if the file is damaged
        return path, json.loads(metrics_path.read_text())
    vision = model_config(plan.model)["vision_cfg"]
    config = TokenizerConfig(image_size=vision["image_size"], patch_size=vision["patch_size"])
    click.echo(f"training the visual tokenizer into {path}")
    if plan.threads:
        torch.set_num_threads(plan.threads)
    tokenizer, metrics = fit_tokenizer(DataConfig(train=plan.corpus / "images.csv"), config)
    save_tokenizer(tokenizer, path, metrics)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    return path, metrics


# The checks every image row reports beside recall; a record without one (a run finished
# before the check existed) gets it from its checkpoint.
IMAGE_CHECKS = ("scene_match@1", "binding_acc", "collection_scene_match@1")


def _run(plan: Plan, row: Row, seed: int, tokenizer: Path | None) -> dict[str, Any]:
    from model.config import TrainConfig
    from training.train import train

    out = plan.run_dir(row, seed)
    result_path = out / "bench.json"
    if result_path.is_file():
        record = json.loads(result_path.read_text())
    else:
        config = TrainConfig.model_validate(plan.config(row, seed, tokenizer))
        click.echo(f"== {row.name} (seed {seed}) -> {out}")
        started = time.perf_counter()
        result = train(config, resume=True)
        record = {
            "row": row.name,
            "seed": seed,
            "modality": row.modality,
            "steps": result.step,
            "wall_s": time.perf_counter() - started,
            "evals": result.evals,
        }
    test = record["evals"].get("test", {})
    checkpoint = out / "checkpoint.pt"
    # A record kept without its checkpoint (an older run's) keeps the checks it has.
    complete = all(check in test for check in IMAGE_CHECKS)
    if row.modality == "image" and checkpoint.is_file() and not complete:
        test.update(_image_checks(checkpoint, test))
    result_path.write_text(json.dumps(record, indent=2))
    return record


def _image_checks(checkpoint: Path, have: dict[str, float]) -> dict[str, float]:
    """The scene-query check on the test split and over the whole corpus, and the binding
    check, for a checkpoint's towers (only those ``have`` lacks)."""
    import torch

    from model.factory import model_config
    from training.binding_check import binding_check
    from training.eval_splits import load_named_split, towers_from_checkpoint
    from training.evaluate import embed_split
    from training.scene_eval import collection_scene_check, scene_query_check
    from training.training_data import CaptionedImages

    towers, config, _ = towers_from_checkpoint(checkpoint)
    context_length = int(model_config(config.model)["text_cfg"].get("context_length", 77))
    cpu = torch.device("cpu")
    split = load_named_split(config, "test", context_length)
    assert isinstance(split, CaptionedImages)
    found: dict[str, float] = {}
    # both checks rank the same test images: embedded once for whichever run
    image_emb = (
        embed_split(towers, split, config.preprocess, cpu)[0]
        if {"scene_match@1", "binding_acc"} - have.keys()
        else None
    )
    if "scene_match@1" not in have:
        checked = scene_query_check(towers, config, split, context_length, cpu, image_emb=image_emb)
        found.update(checked[0] if checked else {})
    if "binding_acc" not in have:
        found.update(
            binding_check(towers, split, config.preprocess, context_length, cpu, image_emb)
        )
    if "collection_scene_match@1" not in have:
        found.update(collection_scene_check(towers, config, context_length, cpu) or {})
    return found


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ±{(max(values) - min(values)) / 2:.1f}"


def _split_table(records: dict[str, list[dict[str, Any]]], split: str, modality: str) -> list[str]:
    a, b = DIRECTIONS[modality]
    header = [f"{d} R@{k}" for d in (a,) for k in KS] + [f"{a} mR"]
    header += [f"{d} R@{k}" for d in (b,) for k in KS] + [f"{b} mR", "mean recall", "seeds"]
    lines = [
        "| row | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for name, runs in records.items():
        evals = [r["evals"][split] for r in runs if split in r["evals"]]
        if not evals or runs[0]["modality"] != modality:
            continue
        cells = []
        for direction in (a, b):
            cells += [_cell([e[f"{direction}_R@{k}"] for e in evals]) for k in KS]
            cells.append(
                _cell([statistics.fmean(e[f"{direction}_R@{k}"] for k in KS) for e in evals])
            )
        cells += [_cell([e["mean_recall"] for e in evals]), str(len(evals))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _intra_table(records: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = [
        "| row | i2i R@1 | i2i R@5 | t2t R@1 | t2t R@5 | t2t R@10 |",
        "|---|---|---|---|---|---|",
    ]
    for name, runs in records.items():
        evals = [r["evals"]["test"] for r in runs if "i2i_R@1" in r["evals"].get("test", {})]
        if not evals:
            continue
        keys = ("i2i_R@1", "i2i_R@5", "t2t_R@1", "t2t_R@5", "t2t_R@10")
        lines.append(f"| {name} | " + " | ".join(_cell([e[k] for e in evals]) for k in keys) + " |")
    return lines


def _scene_table(records: dict[str, list[dict[str, Any]]]) -> list[str]:
    keys = (
        "scene_match@1",
        "scene_match@5",
        "collection_scene_match@1",
        "collection_scene_match@5",
        "t2i_R@1",
    )
    lines = [
        "| row | scene match@1 | scene match@5 | whole corpus @1 | whole corpus @5 | "
        "test t2i R@1 | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    return lines + _test_rows(records, "scene_match@1", keys)


def _test_rows(
    records: dict[str, list[dict[str, Any]]], marker: str, keys: Sequence[str]
) -> list[str]:
    """A table line per row whose test evals hold ``marker``: each key's mean ± half range
    ("—" where a seed lacks it), and the seed count."""
    lines = []
    for name, runs in records.items():
        evals = [r["evals"]["test"] for r in runs if marker in r["evals"].get("test", {})]
        if not evals:
            continue
        cells = [_cell([e[k] for e in evals]) if all(k in e for e in evals) else "—" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(evals)} |")
    return lines


def _time_table(records: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The video rows' time checks (training/video_checks.py), beside t2v R@1."""
    keys = ("t2v_R@1", "time_order_acc", "direction_acc")
    lines = ["| row | t2v R@1 | time order | direction | seeds |", "|---|---|---|---|---|"]
    return lines + _test_rows(records, "time_order_acc", keys)


BINDING_KINDS = ("colour", "shape", "size", "position", "relation", "binding")


def _binding_table(records: dict[str, list[dict[str, Any]]]) -> list[str]:
    header = ["all", *BINDING_KINDS]
    lines = [
        "| row | " + " | ".join(header) + " | seeds |",
        "|---|" + "---|" * (len(header) + 1),
    ]
    keys = ["binding_acc", *(f"binding_acc_{kind}" for kind in BINDING_KINDS)]
    return lines + _test_rows(records, "binding_acc", keys)


def _hardware() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cpu})"
    return f"{device}, {os.cpu_count()} cores, torch {torch.__version__}"


def render(
    plan: Plan,
    records: dict[str, list[dict[str, Any]]],
    tokenizer_metrics: dict[str, Any] | None,
    command: str,
    wall_s: float,
) -> str:
    run_walls = [r["wall_s"] for runs in records.values() for r in runs]
    lines = [
        "# Ablation: `cots bench quality`",
        "",
        f"- command: `{command}`",
        f"- model {plan.model}, {plan.steps} optimiser steps per run, batch {plan.batch_size} "
        f"(video rows: {plan.video_steps} steps of {plan.video_batch_size} clips of 4 frames), "
        f"seeds {', '.join(map(str, plan.seeds))} for the main rows, {plan.seeds[0]} for the "
        "others",
        f"- corpus: the default synthetic corpus (`cots data synth`, seed 0) at {plan.corpus}",
        f"- hardware: {_hardware()}",
        f"- wall time: {sum(run_walls) / 60:.1f} min of training and evaluation over "
        f"{len(run_walls)} runs ({wall_s / 60:.1f} min for this invocation, finished runs reused)",
        "- cells: mean over seeds, ± half the range between them; mR = mean of R@1/5/10 of that "
        "direction; mean recall = mean over both directions",
    ]
    if tokenizer_metrics:
        lines.append(
            "- visual tokenizer (val split): "
            + ", ".join(
                f"{k} {v:.3g}" for k, v in tokenizer_metrics.items() if isinstance(v, int | float)
            )
        )
    for split, title in (("test", "Test split"), ("heldout", "Held-out colour-shape pairs")):
        lines += ["", f"## {title} (text↔image)", "", *_split_table(records, split, "image")]
    lines += [
        "",
        "## Intra-modal retrieval, test split (i2i: shifted view → clean image; t2t: caption → "
        "other captions of its image)",
        "",
        *_intra_table(records),
    ]
    lines += [
        "",
        "## Scene queries (200 queries written from the test scenes; a hit counts when its "
        "scene satisfies every constraint of the query; the oracle is 100 %), searched over the "
        "test split and over the whole corpus (every split's images, as the demo's collection)",
        "",
        *_scene_table(records),
    ]
    lines += [
        "",
        "## Binding, test split (ARO-style: an image's caption against the same caption with "
        "one attribute or relation swapped; % where the true caption scores higher; chance 50)",
        "",
        *_binding_table(records),
    ]
    lines += ["", "## Video, test split (text↔video)", "", *_split_table(records, "test", "video")]
    lines += [
        "",
        "## Video time checks, test split (time order: a caption scores its clip above the clip "
        "played backwards; direction: a moving clip scores its caption above the caption with "
        "the opposite motion; in %)",
        "",
        *_time_table(records),
    ]
    return "\n".join(lines) + "\n"


def _command_line() -> str:
    """This invocation as a command line, options at their defaults left out."""
    context = click.get_current_context()
    parts = ["cots bench quality"]
    for param in context.command.params:
        value = context.params.get(param.name or "")
        if not isinstance(param, click.Option) or value == param.default or value is None:
            continue
        if param.is_flag:
            parts.append(param.opts[-1] if value else param.secondary_opts[-1])
        else:
            parts.append(f"{param.opts[-1]} {value}")
    return " ".join(parts)


@click.command("quality", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--corpus",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("data/synthetic"),
    show_default=True,
    help="Synthetic corpus folder; generated with the defaults when missing.",
)
@click.option(
    "--work",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/bench-quality"),
    show_default=True,
    help="Run folders; finished runs found here are reused.",
)
@click.option("--model", default="cots-tiny-p16", show_default=True, help="Model config.")
@click.option(
    "--steps",
    type=click.IntRange(min=1),
    default=992,
    show_default=True,
    help="Optimiser steps per image run (default: the demo's budget, 16 epochs of 62).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=128,
    show_default=True,
    help="Image-caption pairs per step.",
)
@click.option(
    "--video-batch-size",
    type=click.IntRange(min=2),
    default=32,
    show_default=True,
    help="Clip-caption pairs per step in the video rows (4 frames per clip).",
)
@click.option(
    "--video-steps",
    type=click.IntRange(min=1),
    default=520,
    show_default=True,
    help="Optimiser steps per video run (the demo's: 20 epochs of 26).",
)
@click.option(
    "--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds for the main rows."
)
@click.option(
    "--rows",
    default="all",
    show_default=True,
    help="'all' or comma-separated row numbers (1-based, in table order) to run.",
)
@click.option(
    "--train/--no-train",
    "train_missing",
    default=True,
    show_default=True,
    help="Train the runs not finished yet (--no-train: tabulate the finished ones only).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("docs/bench/quality.md"),
    show_default=True,
    help="Markdown results file (a .json with every raw metric is written beside it).",
)
def quality_bench(
    corpus: Path,
    work: Path,
    model: str,
    steps: int,
    batch_size: int,
    video_batch_size: int,
    video_steps: int,
    seeds: str,
    rows: str,
    train_missing: bool,
    threads: int | None,
    out: Path,
) -> None:
    """Train and evaluate every ablation row at equal steps and write the table.

    Rows: CLIP baseline; + momentum queues; + momentum distillation; + KL alignment (the
    default COTS); full COTS (+ noise filter); masked vision-language modeling and COOKIE on
    top of full COTS; the 30 %-noisy corpus with CLIP, COTS without and with the filter; and
    the video pair (temporal transformer vs mean pooling) on the default COTS run's towers.
    Each image row reports recall on test and held-out and the scene-query check.
    """
    from model.errors import ModelError

    started = time.perf_counter()
    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        message = f"not a list of integers: {seeds!r}"
        raise click.BadParameter(message, param_hint="--seeds") from None
    if not seed_list:
        raise click.BadParameter("give at least one seed", param_hint="--seeds")
    chosen = list(ROWS)
    if rows != "all":
        try:
            chosen = [ROWS[int(i) - 1] for i in rows.split(",")]
        except (ValueError, IndexError):
            message = f"rows are 1..{len(ROWS)}: {rows!r}"
            raise click.BadParameter(message, param_hint="--rows") from None
    plan = Plan(
        corpus, work, model, steps, batch_size, video_batch_size, video_steps, seed_list, threads
    )
    work.mkdir(parents=True, exist_ok=True)
    try:
        _ensure_corpus(corpus)
        tokenizer, tokenizer_metrics = (
            _ensure_tokenizer(plan)
            if train_missing and any(r.needs_tokenizer for r in chosen)
            else (None, None)
        )
        records: dict[str, list[dict[str, Any]]] = {}
        for row in chosen:
            seeds_of_row = seed_list if row.main else seed_list[:1]
            if not train_missing:
                # Only the finished runs: the table of what exists, built while parts still run.
                seeds_of_row = tuple(
                    s for s in seeds_of_row if (plan.run_dir(row, s) / "bench.json").is_file()
                )
            elif row.init_from is not None:
                source = next(r for r in ROWS if r.name == row.init_from)
                _run(plan, source, seed_list[0], tokenizer)
            for seed in seeds_of_row:
                records.setdefault(row.name, []).append(_run(plan, row, seed, tokenizer))
    except ModelError as error:
        raise click.ClickException(str(error)) from None
    text = render(plan, records, tokenizer_metrics, _command_line(), time.perf_counter() - started)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    out.with_suffix(".json").write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    click.echo(text)
