"""``cots bench scene-scoring``: scoring rules that need no training, on the demo's scene queries.

Issue 40's seventh pass found the top five lost on one kind of query: two objects of a
three-object scene (a partial description; the corpus's captions never are), which the recipe
finds 0 times in 22. Two rules that change only how a run's towers score an image are measured
here, each beside the plain cosine, on the hypothesis that the towers know more than one
cosine between two global vectors tells:

- **word head** (runs trained with ``objective.word_prediction``): the cosine plus lambda times
  the head's log-probability of the query's words under the image, IDF-weighted as the head was
  trained (``WordHead.targets``): a bag of words that the image's other objects should not
  lower as much as they lower the cosine;
- **masked views**: each image also embedded with one region painted over in its median colour
  (the background, mostly; no resize, so places and sizes stay), a grid of three rows and three
  columns (6 views) or of nine cells (9). An image's score is max(cosine, best view's cosine -
  delta): a view that hides a three-object scene's third object is a two-object image. Served,
  it would be a multi-vector index (an item found through any of its vectors), 7 or 10 times the
  vectors.

Data flow: a run's checkpoint -> its image tower over every image of the corpus, and over its
masked views -> its text tower over 200 scene queries written from the val scenes (selection)
and the demo's 200 from the test scenes (check) -> for each setting, exact-match rates at 1 and
5 by query kind and scene size (``benchmarks.scenes.query_groups``) -> per rule, the setting
with the best mean of the val rates at 1 and 5, and its test figures beside the plain cosine's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch

from benchmarks.run_options import (
    RunGallery,
    emit,
    encode_texts,
    float_list,
    hardware,
    run_checkpoint,
    run_options,
)
from benchmarks.scenes import query_groups, synthetic_run_gallery

if TYPE_CHECKING:
    from model.word_head import WordHead

# Region grids as (row slice, column slice) in thirds of the side; "rows+cols" hides a row or
# a column, "cells" one cell of the 3x3 grid.
GRIDS = ("rows+cols", "cells")
_IMAGES_PER_BATCH = 256


def region_masks(side: int, grid: str) -> list[tuple[slice, slice]]:
    """The regions a grid hides, one per view, for square images of ``side`` pixels."""
    cuts = [0, side // 3, 2 * side // 3, side]
    thirds = [slice(cuts[i], cuts[i + 1]) for i in range(3)]
    every = slice(None)
    if grid == "rows+cols":
        return [(t, every) for t in thirds] + [(every, t) for t in thirds]
    if grid == "cells":
        return [(r, c) for r in thirds for c in thirds]
    raise ValueError(f"unknown grid {grid!r}; known: {', '.join(GRIDS)}")


def masked_views(images: torch.Tensor, masks: list[tuple[slice, slice]]) -> torch.Tensor:
    """Images [B, C, S, S] -> [B * V, C, S, S]: image b's V views at rows b*V .. b*V+V-1, each
    with one region painted in the image's per-channel median (over all its pixels)."""
    median = images.flatten(2).median(dim=2).values[:, :, None, None]
    views = images[:, None].repeat(1, len(masks), 1, 1, 1)
    for v, (rows, cols) in enumerate(masks):
        region = views[:, v, :, rows, cols]
        views[:, v, :, rows, cols] = median.expand_as(region)
    return views.flatten(0, 1)


@dataclass(frozen=True)
class Setting:
    rule: str  # "plain", "word head" or a grid
    strength: float  # lambda for the word head, delta for a grid

    @property
    def label(self) -> str:
        if self.rule == "plain":
            return "plain cosine"
        name = "lambda" if self.rule == "word head" else "delta"
        return f"{self.rule}, {name}={self.strength:g}"


@torch.no_grad()
def _view_embeddings(run: RunGallery, grid: str) -> torch.Tensor:
    """[N, V, D] the image tower's embeddings of every gallery image's masked views."""
    from training.evaluate import split_images

    parts = []
    n = len(run.gallery.records)
    for start in range(0, n, _IMAGES_PER_BATCH):
        images = split_images(
            run.gallery, start, min(n, start + _IMAGES_PER_BATCH), run.config.preprocess
        )
        masks = region_masks(images.shape[-1], grid)
        emb = run.towers.encode_image(masked_views(images, masks)).float()
        parts.append(emb.reshape(len(images), len(masks), -1))
    return torch.cat(parts)


def _word_log_probs(run: RunGallery) -> tuple[WordHead, torch.Tensor] | None:
    """(the run's word head, [N, V] its log-probabilities of each word under each image), or
    None for a run trained without word prediction."""
    from model.word_head import WordHead

    state, image_emb = run.model_state, run.image_emb
    if "words.vocab" not in state:
        return None
    weights = {k.removeprefix("words."): v for k, v in state.items() if k.startswith("words.")}
    head = WordHead(image_emb.shape[1], weights["vocab"], weights["idf"])
    head.load_state_dict(weights)
    return head, torch.log_softmax(head(image_emb), dim=-1)


ScoreRule = Callable[[float], torch.Tensor]  # a strength -> [Q, N] scores of queries x images


def _score_rules(
    plain: torch.Tensor,
    query_emb: torch.Tensor,
    views: dict[str, torch.Tensor],
    word_score: torch.Tensor | None,
) -> dict[str, ScoreRule]:
    """Each rule's scores by its strength: the plain cosine; the cosine plus lambda times the
    word head's score of the query's words (``word_score`` [Q, N], where the run has a head);
    per grid, an image's best masked view less delta, never below its own cosine."""
    rules: dict[str, ScoreRule] = {"plain": lambda _: plain}
    if word_score is not None:
        rules["word head"] = lambda lam: plain + lam * word_score
    for grid, emb in views.items():
        rules[grid] = _best_view_rule(plain, torch.einsum("qd,nvd->qnv", query_emb, emb))
    return rules


def _best_view_rule(plain: torch.Tensor, view_scores: torch.Tensor) -> ScoreRule:
    """[Q, N, V] the queries' cosines with every image's views -> the best view less delta."""
    best = view_scores.amax(dim=2)
    return lambda delta: torch.maximum(plain, best - delta)


def _selection_key(figures: dict[str, Any]) -> float:
    return (figures["val"]["all"]["@1"] + figures["val"]["all"]["@5"]) / 2


@torch.no_grad()
def measure(
    checkpoint: Path,
    corpus: Path | None,
    lambdas: list[float],
    deltas: list[float],
    n_queries: int = 200,
) -> dict[str, Any]:
    """Every setting's figures on the val and test scene queries, and each rule's choice."""
    from model.tokenizer import tokenize
    from training.scene_eval import split_queries

    run, scenes = synthetic_run_gallery(checkpoint, corpus)
    if run.data.val_split is None:
        raise click.ClickException(f"{checkpoint}: the run has no val split to choose settings on")
    gallery_scenes = [scenes[record.group_id] for record in run.gallery.records]
    top5 = min(5, len(run.image_emb))
    words = _word_log_probs(run)
    views = {grid: _view_embeddings(run, grid) for grid in GRIDS}

    settings = [Setting("plain", 0.0)]
    if words is not None:
        settings += [Setting("word head", lam) for lam in lambdas]
    settings += [Setting(grid, delta) for grid in GRIDS for delta in deltas]
    figures: dict[str, dict[str, Any]] = {s.label: {} for s in settings}
    query_counts = {}
    # the val split chooses, the test split (the demo's queries) checks
    for split, split_name in (("val", run.data.val_split), ("test", "test")):
        queries = split_queries(scenes, run.gallery, split_name, n_queries)
        query_counts[split] = len(queries)
        query_emb = encode_texts(run.towers, [q.text for q in queries], run.context)
        plain = query_emb @ run.image_emb.T
        word_score = None
        if words is not None:
            head, log_probs = words
            word_score = head.targets(tokenize([q.text for q in queries], run.context)) @ (
                log_probs.T
            )
        rules = _score_rules(plain, query_emb, views, word_score)
        for setting in settings:
            scores = rules[setting.rule](setting.strength)
            ranked = scores.topk(top5, dim=1).indices.tolist()
            figures[setting.label][split] = query_groups(queries, ranked, gallery_scenes)

    results = [{"label": s.label, "rule": s.rule, **figures[s.label]} for s in settings]
    chosen = {
        rule: max((r for r in results if r["rule"] == rule), key=_selection_key)["label"]
        for rule in dict.fromkeys(s.rule for s in settings[1:])
    }
    return {
        "checkpoint": str(checkpoint),
        "corpus": str(run.corpus),
        "gallery": len(run.image_emb),
        "views": {grid: int(emb.shape[1]) for grid, emb in views.items()},
        "word_head": words is not None,
        "queries": query_counts,
        "results": results,
        "chosen": chosen,
    }


def _cell(groups: dict[str, dict[str, float]], name: str, key: str) -> str:
    group = groups.get(name)
    return f"{group[key]:.1f}" if group else "—"


def render(measured: dict[str, Any], command: str, hardware: str) -> str:
    views = ", ".join(f"{grid} {n} views" for grid, n in measured["views"].items())
    lines = [
        "# Scoring rules on the scene queries: `cots bench scene-scoring`",
        "",
        f"- command: `{command}`",
        f"- run: {measured['checkpoint']}; corpus: {measured['corpus']}",
        f"- gallery: every image of the corpus ({measured['gallery']:,}); masked views: {views}",
        f"- queries: {measured['queries']['val']} written from the val scenes choose each rule's "
        f"setting (bold), the demo's {measured['queries']['test']} from the test scenes check; "
        "'3-object': relation queries that only a three-object scene satisfies",
        f"- word head: {'yes' if measured['word_head'] else 'none in this run (rule skipped)'}",
        f"- hardware: {hardware}; date: {time.strftime('%Y-%m-%d')}",
        "",
        "| scoring | val @1 | val @5 | test @1 | test @5 | test relation @5: 2-object | "
        "3-object | test place @5 | test object @5 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    chosen = set(measured["chosen"].values())
    for row in measured["results"]:
        val, test = row["val"], row["test"]
        label = f"**{row['label']}**" if row["label"] in chosen else row["label"]
        cells = [
            _cell(val, "all", "@1"),
            _cell(val, "all", "@5"),
            _cell(test, "all", "@1"),
            _cell(test, "all", "@5"),
            _cell(test, "relation, 2-object scenes", "@5"),
            _cell(test, "relation, 3-object scenes", "@5"),
            _cell(test, "place", "@5"),
            _cell(test, "object", "@5"),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


@click.command("scene-scoring", context_settings={"help_option_names": ["-h", "--help"]})
@run_options("Synthetic corpus folder (images.csv, dataset.json).")
@click.option(
    "--lambda",
    "lambdas",
    default="0.02,0.05,0.1,0.2,0.5",
    show_default=True,
    help="Weights of the word head's log-probability of the query's words.",
)
@click.option(
    "--delta",
    "deltas",
    default="0,0.005,0.01,0.015,0.02,0.05",
    show_default=True,
    help="How far under the cosine a masked view's score is taken (0: as it is).",
)
def scene_scoring_bench(
    run: Path,
    corpus: Path | None,
    threads: int | None,
    out: Path | None,
    lambdas: str,
    deltas: str,
) -> None:
    """Scoring rules that need no retraining (the word head's score of a query's words added to
    the cosine; the best of each image's masked views) against the plain cosine of a trained
    run, on scene queries over every image of its synthetic corpus: queries from the val scenes
    choose each rule's strength, the demo's test scene queries check. Prints a markdown table."""
    lambda_list = float_list(lambdas, "lambda")
    delta_list = float_list(deltas, "delta", allow_zero=True)
    checkpoint = run_checkpoint(run, threads)
    measured = measure(checkpoint, corpus, lambda_list, delta_list)
    command = (
        f"cots bench scene-scoring --run {run} --corpus {measured['corpus']} "
        f"--lambda {lambdas} --delta {deltas}"
    )
    text = render(measured, command + (f" --threads {threads}" if threads else ""), hardware())
    emit(text, measured, out)
