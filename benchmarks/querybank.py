"""``cots bench querybank``: does a hubness correction of the gallery rank what people type better?

In a high-dimensional gallery some items are *hubs*: near many queries, they crowd the top of
lists they do not belong to (Radovanović et al., JMLR 2010). CSLS (Conneau et al., ICLR 2018)
and querybank normalisation (QB-Norm, Bogolin et al., CVPR 2022) correct for it with a bank of
typical queries: an item x scores ``2 cos(q, x) - r(q) - r(x)`` for a query q, where ``r(x)`` is
the mean similarity of x to its k nearest bank queries. ``r(q)`` is the same for every item of
one query, so the ranking is that of ``cos(q, x) - beta * r(x)``: one number per item, computed
once, offline, from the item's vector and the bank, and a search as cheap as a plain one.

Data flow: a run's checkpoint -> its image tower over every image of the corpus (all splits,
as the demo's ``images`` collection holds them) -> its text tower over the bank (the training
split's distinct captions: no test caption, so no test image is penalised for being described)
-> ``r(x)`` per k -> for each (k, beta), two figures side by side with the plain ranking
(beta 0):

- **selection**: each validation caption searched over the whole gallery, R@1 / R@5 of its own
  image; on a synthetic corpus also 200 scene queries written from the *validation* scenes
  (short, partial, as people type; the captions are neither), and (k, beta) is chosen on
  these (the mean of their rates at 1 and 5), else on the captions' R@1;
- **check**: on a synthetic corpus, the demo's 200 scene queries (written from the test scenes)
  scored as the demo scores them, which no choice here looks at.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from benchmarks.run_options import (
    emit,
    encode_texts,
    float_list,
    hardware,
    load_run_gallery,
    run_checkpoint,
    run_options,
)

# Items scored per block: a [block, M] similarity matrix at a time, not [N, M].
_BLOCK = 2048


def hubness(items: torch.Tensor, bank: torch.Tensor, k: int, block: int = _BLOCK) -> torch.Tensor:
    """[N] the mean of each item's ``k`` highest inner products with the bank's rows (items
    [N, D] and bank [M, D], both L2-normalised: cosines); k is capped at M."""
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    k = min(k, len(bank))
    parts = [
        (items[start : start + block] @ bank.T).topk(k, dim=1).values.mean(dim=1)
        for start in range(0, len(items), block)
    ]
    return torch.cat(parts) if parts else items.new_zeros(0)


@dataclass(frozen=True)
class Setting:
    k: int
    beta: float

    @property
    def label(self) -> str:
        return "plain cosine" if self.beta == 0 else f"k={self.k}, beta={self.beta:g}"


def _selection_key(figures: dict[str, Any]) -> tuple[float, ...]:
    """What (k, beta) is chosen on: the validation scene queries where there are some (the
    mean of their rates at 1 and 5), then the validation captions' R@1 and R@5."""
    scenes = (
        (figures["val_scene@1"] + figures["val_scene@5"]) / 2 if "val_scene@1" in figures else 0.0
    )
    return (scenes, figures["val_R@1"], figures["val_R@5"])


def _own_image_recall(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """R@1 and R@5 (%) of each query's own gallery index under ``scores`` [Q, N]."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return {
        "val_R@1": 100.0 * float(hits[:, 0].float().mean()),
        "val_R@5": 100.0 * float(hits.any(dim=1).float().mean()),
    }


@torch.no_grad()
def measure(
    checkpoint: Path, corpus: Path | None, settings: list[Setting], n_queries: int = 200
) -> dict[str, Any]:
    """Every setting's figures (plus the plain ranking's), and the sizes they rest on;
    ``corpus`` None: the run's own."""
    from model.data.synth.scenes import Scene
    from training.scene_eval import split_queries
    from training.scene_queries import SceneQuery, corpus_scenes, score

    # every split: the gallery, and through each image's split its bank or validation captions
    run = load_run_gallery(checkpoint, corpus)
    towers, context, corpus, data = run.towers, run.context, run.corpus, run.data
    gallery, image_emb = run.gallery, run.image_emb
    records = list(enumerate(gallery.records))
    bank_texts = sorted(
        {
            text
            for _, record in records
            if record.split == data.train_split
            for text in record.captions
        }
    )
    if not bank_texts:
        raise click.ClickException(f"{corpus / 'images.csv'}: no train-split caption for a bank")
    val = [(text, i) for i, r in records if r.split == data.val_split for text in r.captions]
    if not val:
        raise click.ClickException(f"{corpus / 'images.csv'}: no val-split caption to select on")
    bank = encode_texts(towers, bank_texts, context)
    val_emb = encode_texts(towers, [text for text, _ in val], context)
    val_targets = torch.tensor([i for _, i in val])
    val_scores = val_emb @ image_emb.T

    scenes = corpus_scenes(corpus)
    scene_gallery: list[Scene] = []
    # name -> (queries, their scores over the gallery): "val_scene" chooses, "scene" checks
    scene_sets: dict[str, tuple[list[SceneQuery], torch.Tensor]] = {}
    if scenes is not None:
        scene_gallery = [scenes[record.group_id] for record in gallery.records]
        for name, split_name in (("val_scene", data.val_split), ("scene", "test")):
            written = split_queries(scenes, gallery, split_name, n_queries)
            emb = encode_texts(towers, [q.text for q in written], context)
            scene_sets[name] = (written, emb @ image_emb.T)

    hub = {k: hubness(image_emb, bank, k) for k in sorted({s.k for s in settings})}
    results = []
    for setting in [Setting(0, 0.0), *settings]:
        offset = setting.beta * hub[setting.k] if setting.beta else 0.0
        figures = _own_image_recall(val_scores - offset, val_targets)
        for name, (written, query_scores) in scene_sets.items():
            ranked = (query_scores - offset).topk(min(5, len(image_emb)), dim=1).indices
            scored = score(written, scene_gallery, ranked.numpy())
            figures[f"{name}@1"] = scored["scene_match@1"]
            figures[f"{name}@5"] = scored["scene_match@5"]
        results.append({"k": setting.k, "beta": setting.beta, "label": setting.label, **figures})
    chosen = max(results[1:], key=_selection_key, default=results[0])
    return {
        "checkpoint": str(checkpoint),
        "corpus": str(corpus),
        "gallery": len(image_emb),
        "bank": len(bank_texts),
        "val_captions": len(val),
        "scene_queries": len(scene_sets["scene"][0]) if scene_sets else 0,
        "results": results,
        "chosen": chosen["label"],
    }


def render(measured: dict[str, Any], command: str, hardware: str) -> str:
    scene = measured["scene_queries"] > 0
    head = "| ranking | val R@1 | val R@5 |"
    if scene:
        head += " val scene @1 | val scene @5 | **test scene @1** | **test scene @5** |"
    lines = [
        "# Querybank normalisation: `cots bench querybank`",
        "",
        f"- command: `{command}`",
        f"- run: {measured['checkpoint']}; corpus: {measured['corpus']}",
        f"- gallery: every image of the corpus ({measured['gallery']:,}); bank: the train "
        f"split's {measured['bank']:,} distinct captions; selection: {measured['val_captions']:,}"
        " val captions, each searched for its own image over the whole gallery"
        + (
            f", and as many scene queries written from the val scenes; check: the demo's "
            f"{measured['scene_queries']} scene queries, from the test scenes (never used to "
            "choose)"
            if scene
            else ""
        ),
        f"- hardware: {hardware}; date: {time.strftime('%Y-%m-%d')}",
        f"- chosen on {'the val scene queries' if scene else 'val R@1'}: **{measured['chosen']}**",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for row in measured["results"]:
        cells = [f"{row['val_R@1']:.1f}", f"{row['val_R@5']:.1f}"]
        if scene:
            keys = ("val_scene@1", "val_scene@5", "scene@1", "scene@5")
            cells += [f"{row[key]:.1f}" for key in keys]
        label = f"**{row['label']}**" if row["label"] == measured["chosen"] else row["label"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"each k must be at least 1: {text!r}")
    return values


@click.command("querybank", context_settings={"help_option_names": ["-h", "--help"]})
@run_options("Corpus folder with images.csv (train, val and test splits).")
@click.option("--k", "ks", default="1,5,10", show_default=True, help="Bank neighbours per item.")
@click.option("--beta", "betas", default="0.25,0.5,1.0", show_default=True, help="Weights.")
def querybank_bench(
    run: Path,
    corpus: Path | None,
    threads: int | None,
    out: Path | None,
    ks: str,
    betas: str,
) -> None:
    """Hubness correction (CSLS / querybank normalisation) against the plain cosine ranking of
    a trained run, over every image of its corpus: val captions and scene queries written from
    the val scenes choose (k, beta), the demo's test scene queries check. Prints a markdown
    table."""
    settings = [Setting(k, beta) for k in _ints(ks) for beta in float_list(betas, "beta")]
    checkpoint = run_checkpoint(run, threads)
    measured = measure(checkpoint, corpus, settings)
    command = (
        f"cots bench querybank --run {run} --corpus {measured['corpus']} --k {ks} --beta {betas}"
    )
    text = render(measured, command + (f" --threads {threads}" if threads else ""), hardware())
    emit(text, measured, out)
