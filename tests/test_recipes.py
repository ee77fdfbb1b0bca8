"""Recipes as files (training/recipes/): the demo and ``cots bench quality`` build exactly the
training configs their Python dicts built before the move, and ``cots train --config`` reads
every recipe. Equal configs and the same seeds give the same numbers, so this proves the
figures unchanged without training."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner

from benchmarks.quality import ROWS, Plan, Row
from cots.demo import _image_config, _video_config, _video_fit
from model.config import HardNegativeConfig, TrainConfig, WordPredictionConfig
from model.errors import ModelError
from training.cli import train as train_command
from training.recipes import (
    RECIPES,
    load_train_config,
    read_recipe,
    recipe_names,
    recipe_path,
    strip_notes,
)

ROOT = Path(__file__).resolve().parent.parent

# ---- the frozen reference: the pre-move values of commit 1a2937d -------------------------------
# cots/demo.py's image options (the command line's defaults), VIDEO_BATCH and VIDEO_OPTIONS, and
# how _train, _video_options and _train_video turned them into overrides.
OLD_IMAGE_DEFAULTS = {"model": "cots-tiny-p16", "epochs": 16, "batch_size": 128}
OLD_VIDEO_BATCH = 32
OLD_VIDEO_OPTIONS: dict[str, object] = {
    "data.modality": "video",
    "data.group_key": "video_id",
    "data.eval_splits": ["test"],
    "objective.kind": "clip",
    "objective.time_order_weight": 2.0,
    "objective.text_anchor.weight": 10.0,
    "freeze": ["image"],
    "batch_size": OLD_VIDEO_BATCH,
    "epochs": 20,
    "lr": 2e-3,
    "warmup_steps": 20,
}


def old_image_config(workdir: Path, corpus: Path, options: dict[str, object]) -> TrainConfig:
    output = workdir / "runs" / str(options["model"])
    overrides = [f"{key}={json.dumps(value)}" for key, value in options.items()]
    overrides += [
        f"data.train={json.dumps(str(corpus / 'images.csv'))}",
        f"output={json.dumps(str(output))}",
    ]
    return load_train_config(None, overrides)


def old_video_options(splits: dict[str, int]) -> dict[str, object] | None:
    train, test = splits.get("train", 0), splits.get("test", 0)
    if train < 2 or test < 1:
        return None
    options = {**OLD_VIDEO_OPTIONS, "batch_size": min(OLD_VIDEO_BATCH, train)}
    if not splits.get("val"):
        options["data.val_split"] = None
    return options


def old_video_config(
    workdir: Path, corpus: Path, model_name: str, options: dict[str, object]
) -> TrainConfig:
    settings = {
        **options,
        "model": model_name,
        "data.train": str(corpus / "videos.csv"),
        "init_from": str(workdir / "runs" / model_name / "checkpoint.pt"),
        "objective.text_anchor.captions": str(corpus / "images.csv"),
        "output": str(workdir / "runs" / f"{model_name}-video"),
    }
    return load_train_config(None, [f"{k}={json.dumps(v)}" for k, v in settings.items()])


# ---- changes since the reference, each named with its issue -----------------------------------
# Issue 40: the video run holds its text tower to the image run's embeddings at weight 300 (100
# in the first pass), not 10, and trains with hard negative captions; the bench's video rows
# start from the first pass's default image row (COTS + hard negatives).
def issue_40_video(old: TrainConfig) -> TrainConfig:
    objective = old.objective.model_copy(
        update={
            "text_anchor": old.objective.text_anchor.model_copy(update={"weight": 300.0}),
            "hard_negatives": HardNegativeConfig(enabled=True),
        }
    )
    return old.model_copy(update={"objective": objective})


# Issue 40 (second pass): the video run builds its towers as the image run it starts from
# (model and image stem).
def issue_40_stem_video(old: TrainConfig, image: TrainConfig) -> TrainConfig:
    return old.model_copy(update={"image_stem": image.image_stem})


# Issue 40 (ninth pass): the demo's video run also plays half the clips whose caption names a
# change in time backwards, with the caption turned around (video.reverse_share). The bench's
# video rows keep the recipe they were measured with.
def issue_40_reversed_video(old: TrainConfig) -> TrainConfig:
    return old.model_copy(update={"video": old.video.model_copy(update={"reverse_share": 0.5})})


def issue_40_video_init(old: TrainConfig, plan: Plan) -> TrainConfig:
    source = next(row for row in ROWS if row.name == "COTS + hard negatives")
    return old.model_copy(
        update={"init_from": plan.run_dir(source, plan.seeds[0]) / "checkpoint.pt"}
    )


# Issue 40: the demo's image run trains with hard negative captions; since its second pass, with
# the conv stem and hard negative images too; since its third, negatives of the kinds shape,
# binding and relation only, and no validation pass after each epoch; since its fourth,
# caption-word prediction from the image and the text embeddings through one head.
def issue_40_image(old: TrainConfig) -> TrainConfig:
    negatives = HardNegativeConfig(
        enabled=True, image_share=0.5, kinds=["shape", "binding", "relation"]
    )
    words = WordPredictionConfig(weight=1.0, text=True)
    objective = old.objective.model_copy(
        update={"hard_negatives": negatives, "word_prediction": words}
    )
    return old.model_copy(
        update={"objective": objective, "image_stem": "conv", "eval_every_epoch": False}
    )


_SHAPE_NEGATIVES: dict[str, Any] = {
    "enabled": True,
    "kinds": ["shape", "binding", "relation"],
    "image_share": 0.5,
}
_RECIPE_LEVERS = (
    "caption-word prediction from image and text + hard negatives of kind shape, binding,"
    " relation + conv stem + hard negative images"
)


def _recipe(kind: str = "cots", **top: Any) -> dict[str, Any]:
    """Row 24's overrides (the demo recipe's levers) with the objective ``kind`` and extra
    top-level keys (``max_steps``, ``data``)."""
    return {
        **top,
        "image_stem": "conv",
        "objective": {
            "kind": kind,
            "hard_negatives": {**_SHAPE_NEGATIVES},
            "word_prediction": {"weight": 1.0, "text": True},
        },
    }


# The demo's video recipe as the bench trains it (issue 40: text anchor 300, hard negatives).
_DEMO_VIDEO: dict[str, Any] = {
    "objective": {
        "kind": "clip",
        "time_order_weight": 2.0,
        "text_anchor": {"weight": 300.0},
        "hard_negatives": {"enabled": True},
    },
    "freeze": ["image"],
    "lr": 2e-3,
    "warmup_steps": 20,
}


# Issue 40: rows added after the reference's twelve (the old rows keep their numbers).
ISSUE_40_ROWS: tuple[Row, ...] = (
    Row(
        "CLIP + hard negatives",
        {"objective": {"kind": "clip", "hard_negatives": {"enabled": True}}},
        main=True,
    ),
    Row(
        "COTS + hard negatives",
        {"objective": {"kind": "cots", "hard_negatives": {"enabled": True}}},
        main=True,
    ),
    Row(
        "COTS + hard negatives + masked language modeling (corpus vocabulary)",
        {
            "objective": {
                "kind": "cots",
                "hard_negatives": {"enabled": True},
                "masked": {"mlm_weight": 0.1, "mlm_vocab": "corpus"},
            }
        },
    ),
    # second pass: the conv stem, then hard negative images with and without negative captions
    Row(
        "COTS + hard negatives + conv stem",
        {"image_stem": "conv", "objective": {"kind": "cots", "hard_negatives": {"enabled": True}}},
        main=True,
    ),
    Row(
        "COTS + hard negatives + conv stem + hard negative images",
        {
            "image_stem": "conv",
            "objective": {"kind": "cots", "hard_negatives": {"enabled": True, "image_share": 0.5}},
        },
        main=True,
    ),
    Row(
        "COTS + conv stem + hard negative images, no negative captions",
        {
            "image_stem": "conv",
            "objective": {
                "kind": "cots",
                "hard_negatives": {"enabled": True, "fraction": 0.0, "image_share": 0.5},
            },
        },
    ),
    # third pass: negatives of the kinds shape is in, distillation off and at 0.6, half the captions
    Row(
        "COTS + hard negatives of kind shape, binding, relation + conv stem + hard negative images",
        {
            "image_stem": "conv",
            "objective": {"kind": "cots", "hard_negatives": {**_SHAPE_NEGATIVES}},
        },
    ),
    Row(
        "COTS without momentum distillation + hard negatives + conv stem + hard negative images",
        {
            "image_stem": "conv",
            "objective": {
                "kind": "cots",
                "distill_alpha": 0.0,
                "hard_negatives": {"enabled": True, "image_share": 0.5},
            },
        },
    ),
    Row(
        "COTS with momentum distillation 0.6 + hard negatives of kind shape, binding, relation"
        " + conv stem + hard negative images",
        {
            "image_stem": "conv",
            "objective": {
                "kind": "cots",
                "distill_alpha": 0.6,
                "hard_negatives": {**_SHAPE_NEGATIVES},
            },
        },
    ),
    Row(
        "COTS + hard negatives of kind shape, binding, relation for half the captions + conv stem"
        " + hard negative images",
        {
            "image_stem": "conv",
            "objective": {"kind": "cots", "hard_negatives": {**_SHAPE_NEGATIVES, "fraction": 0.5}},
        },
    ),
    Row(
        "COTS + caption-word prediction + hard negatives of kind shape, binding, relation + conv"
        " stem + hard negative images",
        {
            "image_stem": "conv",
            "objective": {
                "kind": "cots",
                "hard_negatives": {**_SHAPE_NEGATIVES},
                "word_prediction": {"weight": 1.0},
            },
        },
    ),
    Row(f"COTS + {_RECIPE_LEVERS}", _recipe(), main=True),
    # fifth pass: a heavier head, a head that names word pairs, and no negative captions
    Row(
        "COTS + caption-word prediction 2.0 from image and text + hard negatives of kind shape,"
        " binding, relation + conv stem + hard negative images",
        {
            "image_stem": "conv",
            "objective": {
                "kind": "cots",
                "hard_negatives": {**_SHAPE_NEGATIVES},
                "word_prediction": {"weight": 2.0, "text": True},
            },
        },
    ),
    Row(
        "COTS + caption-word and word-pair prediction from image and text + hard negatives of"
        " kind shape, binding, relation + conv stem + hard negative images",
        {
            "image_stem": "conv",
            "objective": {
                "kind": "cots",
                "hard_negatives": {**_SHAPE_NEGATIVES},
                "word_prediction": {"weight": 1.0, "text": True, "bigrams": True},
            },
        },
    ),
    Row(
        "COTS + caption-word prediction from image and text + conv stem + hard negative images,"
        " no negative captions",
        {
            "image_stem": "conv",
            "objective": {
                "kind": "cots",
                "hard_negatives": {**_SHAPE_NEGATIVES, "fraction": 0.0},
                "word_prediction": {"weight": 1.0, "text": True},
            },
        },
    ),
    # sixth pass: the recipe (row 24) at three quarters and one and a half of its steps
    *(
        Row(f"COTS + {_RECIPE_LEVERS}, {steps} steps ({epochs} epochs)", _recipe(max_steps=steps))
        for steps, epochs in ((744, 12), (1488, 24))
    ),
    # and CLIP with every lever of the recipe, the same recipe in the comparison
    Row(f"CLIP + {_RECIPE_LEVERS}", _recipe("clip"), main=True),
    # seventh pass: the recipe with a partial caption (cut after its first conjunct) per image
    Row(
        f"COTS + {_RECIPE_LEVERS} + partial captions",
        _recipe(data={"partial_captions": 1}),
    ),
    # ninth pass: the video recipe on the demo's own image towers (row 24), without and with
    # reversed clips
    *(
        Row(
            f"video: temporal transformer on the demo's towers{suffix}",
            {
                **_DEMO_VIDEO,
                "video": {"pooling": "temporal", **video},
                "image_stem": "conv",
            },
            modality="video",
            init_from=f"COTS + {_RECIPE_LEVERS}",
        )
        for suffix, video in (("", {}), (" + reversed clips", {"reverse_share": 0.5}))
    ),
)


# benchmarks/quality.py's ROWS.
_MVLM = {"mlm_weight": 0.1, "mvm_weight": 0.1}
_QUEUES = {"kind": "cots", "kl_weight": 0.0, "distill_alpha": 0.0}
_FILTER = {"enabled": True}
_VIDEO = {
    "objective": {"kind": "clip", "time_order_weight": 2.0, "text_anchor": {"weight": 10.0}},
    "freeze": ["image"],
    "lr": 2e-3,
    "warmup_steps": 20,
}
_NOISY = {"noise_fraction": 0.3}
_DEFAULT_COTS = "+ KL alignment (the default COTS)"
OLD_ROWS: tuple[Row, ...] = (
    Row("CLIP baseline", {"objective": {"kind": "clip"}}, main=True),
    Row("+ momentum queues", {"objective": _QUEUES}, main=True),
    Row("+ momentum distillation", {"objective": {**_QUEUES, "distill_alpha": 0.4}}, main=True),
    Row(_DEFAULT_COTS, {"objective": {"kind": "cots"}}, main=True),
    Row("full COTS (+ noise filter)", {"objective": {"filter": _FILTER}}, main=True),
    Row(
        "full COTS + masked VL modeling",
        {"objective": {"masked": _MVLM, "filter": _FILTER}},
        needs_tokenizer=True,
    ),
    Row(
        "full COTS + COOKIE (shared head + intra-modal)",
        {"objective": {"filter": _FILTER, "intra": {"weight": 0.5}}, "cookie": {"enabled": True}},
    ),
    Row("noisy 30 %: CLIP baseline", {"objective": {"kind": "clip"}, "data": _NOISY}),
    Row("noisy 30 %: COTS, no filter", {"data": _NOISY}),
    Row(
        "noisy 30 %: full COTS (+ noise filter)", {"objective": {"filter": _FILTER}, "data": _NOISY}
    ),
    Row(
        "video: temporal transformer",
        {**_VIDEO, "video": {"pooling": "temporal"}},
        modality="video",
        init_from=_DEFAULT_COTS,
    ),
    Row(
        "video: mean pooling",
        {**_VIDEO, "video": {"pooling": "mean"}},
        modality="video",
        init_from=_DEFAULT_COTS,
    ),
)
# ------------------------------------------------------------------------------------------------

WORKDIR, CORPUS = Path("cots-demo"), Path("cots-demo/corpus")


@pytest.mark.parametrize(
    "options",
    [
        {"model": None, "epochs": None, "batch_size": None},  # cots demo's defaults
        {"model": "cots-micro", "epochs": 1, "batch_size": 16},  # tests/test_cli.py's demo
        {"model": None, "epochs": 3, "batch_size": None},
    ],
)
def test_the_demo_image_recipe_builds_the_old_config(options: dict[str, object]) -> None:
    given = {key: value for key, value in options.items() if value is not None}
    old = old_image_config(WORKDIR, CORPUS, {**OLD_IMAGE_DEFAULTS, **given})
    new = _image_config(WORKDIR, CORPUS, options)
    assert new.model_dump() == issue_40_image(old).model_dump()
    assert new.seed == 0


@pytest.mark.parametrize(
    "splits",
    [
        {"train": 800, "val": 100, "test": 100},  # the default corpus
        {"train": 28, "test": 6},  # tests/test_cli.py's: fewer clips than a batch, no val
        {"train": 1, "test": 1},  # too few: no video model
    ],
)
def test_the_demo_video_recipe_builds_the_old_config(splits: dict[str, int]) -> None:
    old_options, fit = old_video_options(splits), _video_fit(splits)
    assert (old_options is None) == (fit is None)
    if old_options is None or fit is None:
        return
    for model_name in ("cots-tiny-p16", "cots-micro"):
        old = old_video_config(WORKDIR, CORPUS, model_name, old_options)
        image = _image_config(WORKDIR, CORPUS, {"model": model_name})
        new = _video_config(WORKDIR, CORPUS, image, fit)
        expected = issue_40_reversed_video(issue_40_stem_video(issue_40_video(old), image))
        assert new.model_dump() == expected.model_dump()


def test_the_quality_rows_are_the_old_rows_and_build_the_old_configs(tmp_path: Path) -> None:
    # same order: --rows N; issue 40's rows come after the reference's
    assert [row.name for row in ROWS] == [row.name for row in OLD_ROWS + ISSUE_40_ROWS]
    plan = Plan(
        corpus=tmp_path / "corpus",
        work=tmp_path / "work",
        model="cots-tiny-p16",
        steps=992,
        batch_size=128,
        video_batch_size=32,
        video_steps=520,
        seeds=(0, 1, 2),
        threads=None,
    )
    tokenizer = tmp_path / "work" / "visual-tokenizer.pt"
    for new_row, old_row in zip(ROWS, OLD_ROWS + ISSUE_40_ROWS, strict=True):
        if old_row in OLD_ROWS and old_row.modality == "video":  # issue_40_video, below
            assert new_row.name == old_row.name
            assert new_row.init_from == "COTS + hard negatives"
        else:
            assert new_row == old_row
        for seed in plan.seeds:
            new = TrainConfig.model_validate(plan.config(new_row, seed, tokenizer))
            old = TrainConfig.model_validate(plan.config(old_row, seed, tokenizer))
            if old_row in OLD_ROWS and old_row.modality == "video":
                old = issue_40_video_init(issue_40_video(old), plan)
            assert new.model_dump() == old.model_dump()
            assert new.seed == seed


def test_the_bench_video_rows_are_the_demo_video_recipe() -> None:
    """The video rows train the demo's video recipe, with the bench's batch and steps (and
    without its reversed clips, added after they were measured: issue_40_reversed_video)."""
    demo = strip_notes(read_recipe(recipe_path("demo-video")))
    for row in ROWS:
        if row.modality == "video":
            for key in ("objective", "freeze", "lr", "warmup_steps"):
                assert row.overrides[key] == demo[key], (row.name, key)


def _train_args(name: str) -> list[str]:
    """What a recipe needs from the command line besides itself: the paths of a run."""
    data = strip_notes(read_recipe(recipe_path(name)))
    args = ["--set", "max_steps=1", "--data", "corpus/images.csv", "--output", "runs/x"]
    if data.get("objective", {}).get("text_anchor", {}).get("weight"):
        args += ["--set", "objective.text_anchor.captions=corpus/images.csv"]
    if data.get("objective", {}).get("masked", {}).get("mvm_weight"):
        args += ["--set", "objective.masked.visual_tokenizer=visual-tokenizer.pt"]
    return args


@pytest.mark.parametrize("name", recipe_names())
def test_cots_train_reads_every_recipe(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cots train --config`` with the file's path and with the recipe's name parses it into
    the config the bench or demo would build from it (training itself is stubbed)."""
    import training.train

    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig, **_: Any) -> SimpleNamespace:
        seen.append(config)
        return SimpleNamespace(step=0, output=config.output)

    monkeypatch.setattr(training.train, "train", fake_train)
    path = recipe_path(name)
    assert path.is_relative_to(RECIPES)
    assert str(read_recipe(path)["_command"]).startswith("cots ")
    for config in (str(path.relative_to(ROOT)), name):
        result = CliRunner().invoke(train_command, ["--config", config, *_train_args(name)])
        assert result.exit_code == 0, result.output
    expected = strip_notes(read_recipe(path))
    assert seen[0] == seen[1]
    assert seen[0].max_steps == 1
    assert seen[0].model_dump()["lr"] == expected.get("lr", TrainConfig().lr)


def test_notes_are_dropped_and_unknown_keys_still_fail(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"_command": "cots train --config good.json", "lr": 0.01}))
    assert load_train_config(good, []).lr == 0.01
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"_command": "x", "lrr": 0.01}))
    with pytest.raises(ModelError, match="lrr"):
        load_train_config(bad, [])
    with pytest.raises(ModelError, match="does not exist"):
        load_train_config(tmp_path / "missing.json", [])
    with pytest.raises(ModelError, match="no recipe 'nope'"):
        recipe_path("nope")


def test_the_recipes_ship_in_the_wheel() -> None:
    """pyproject.toml's package data for ``training`` covers every recipe file, so the wheel the
    Docker images install (and run ``cots demo`` from) holds them."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["training"]
    shipped = {path for pattern in patterns for path in (ROOT / "training").glob(pattern)}
    assert set(RECIPES.rglob("*.json")) <= shipped
    assert len(recipe_names()) == 2 + len(ROWS)
