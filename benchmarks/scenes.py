"""``cots bench scenes``: where a run's scene queries are lost, by kind and by scene size.

The demo prints one figure for its 200 scene queries (the top hit, one of the top five). This
splits it the way issue 40's seventh pass needed: by the kind of query (an object in its place,
two objects and a relation, an object alone), and a relation query by how many objects the
scenes that satisfy it hold (a query that names two of a three-object scene's objects is a
partial description; the corpus's captions never are). Beside it, each test caption searched for
its own image, by the image's object count, tells the image side from the text side: if full
captions find three-object images and two-object queries do not, the images are not the problem.

Data flow: a run's checkpoint -> its image tower over every image of the corpus (all splits, as
the demo's ``images`` collection holds them) -> its text tower over the demo's scene queries
(written from the test scenes) and the test captions -> cosine ranking -> exact-match rates per
group (``training.scene_queries.satisfies``) and own-image R@1 / R@5 per object count. Needs a
synthetic corpus (its ``dataset.json`` gives the scenes).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import torch

from benchmarks.run_options import (
    RunGallery,
    emit,
    encode_texts,
    hardware,
    load_run_gallery,
    run_checkpoint,
    run_options,
)

if TYPE_CHECKING:
    from model.data.synth.scenes import Scene
    from training.scene_queries import SceneQuery


def _rates(hits: list[tuple[bool, bool]]) -> dict[str, float]:
    """{"n", "@1", "@5"} of (top hit satisfies, one of the top five does) pairs, in %."""
    n = len(hits)
    return {
        "n": n,
        "@1": 100.0 * sum(h[0] for h in hits) / n if n else 0.0,
        "@5": 100.0 * sum(h[1] for h in hits) / n if n else 0.0,
    }


def query_groups(
    queries: Sequence[SceneQuery], ranked: Sequence[Sequence[int]], gallery_scenes: list[Scene]
) -> dict[str, dict[str, float]]:
    """Exact-match rates of queries whose top gallery indices are ``ranked`` (best first, up
    to five), for all of them, per kind, and per relation query's scene size (the fewest
    objects of a gallery scene that satisfies it), sorted by group name."""
    from training.scene_queries import satisfies

    groups: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for query, row in zip(queries, ranked, strict=True):
        hits = [satisfies(gallery_scenes[i], query) for i in row]
        result = (hits[0], any(hits))
        groups["all"].append(result)
        groups[query.kind].append(result)
        if query.kind == "relation":
            sizes = [len(s.objects) for s in gallery_scenes if satisfies(s, query)]
            if sizes:
                groups[f"relation, {min(sizes)}-object scenes"].append(result)
    return {name: _rates(hits) for name, hits in sorted(groups.items())}


def synthetic_run_gallery(
    checkpoint: Path, corpus: Path | None
) -> tuple[RunGallery, dict[str, Scene]]:
    """The run's gallery (``load_run_gallery``) and its corpus's scene per image id; a
    ClickException for a corpus without scene specs, checked before any image is embedded
    when ``corpus`` is given."""
    from training.scene_queries import corpus_scenes

    if corpus is not None and corpus_scenes(corpus) is None:
        raise click.ClickException(f"{corpus}: no dataset.json (scene specs): not synthetic")
    run = load_run_gallery(checkpoint, corpus)
    scenes = corpus_scenes(run.corpus)
    if scenes is None:
        raise click.ClickException(f"{run.corpus}: no dataset.json (scene specs): not synthetic")
    return run, scenes


@torch.no_grad()
def measure(checkpoint: Path, corpus: Path | None, n_queries: int = 200) -> dict[str, Any]:
    """Scene queries by group and test captions by object count; ``corpus`` None: the run's."""
    from training.scene_eval import split_queries

    run, scenes = synthetic_run_gallery(checkpoint, corpus)
    towers, context, corpus, gallery, image_emb = (
        run.towers,
        run.context,
        run.corpus,
        run.gallery,
        run.image_emb,
    )
    gallery_scenes = [scenes[record.group_id] for record in gallery.records]
    top5 = min(5, len(image_emb))

    queries = split_queries(scenes, gallery, "test", n_queries)
    query_emb = encode_texts(towers, [q.text for q in queries], context)
    ranked = (query_emb @ image_emb.T).topk(top5, dim=1).indices.tolist()
    grouped = query_groups(queries, ranked, gallery_scenes)

    captions = [
        (text, i)
        for i, record in enumerate(gallery.records)
        if record.split == "test"
        for text in gallery.captions[i]
    ]
    caption_emb = encode_texts(towers, [text for text, _ in captions], context)
    by_size: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for start in range(0, len(captions), 1024):
        block = captions[start : start + 1024]
        top = (caption_emb[start : start + len(block)] @ image_emb.T).topk(top5, dim=1).indices
        for (_, own), row in zip(block, top.tolist(), strict=True):
            size = len(gallery_scenes[own].objects)
            by_size[f"{size}-object images"].append((row[0] == own, own in row))
    return {
        "checkpoint": str(checkpoint),
        "corpus": str(corpus),
        "gallery": len(image_emb),
        "scene_queries": grouped,
        "test_captions": {name: _rates(hits) for name, hits in sorted(by_size.items())},
    }


def render(measured: dict[str, Any], command: str, hardware: str) -> str:
    lines = [
        "# Scene queries by kind and scene size: `cots bench scenes`",
        "",
        f"- command: `{command}`",
        f"- run: {measured['checkpoint']}; corpus: {measured['corpus']}",
        f"- gallery: every image of the corpus ({measured['gallery']:,}); queries: the demo's, "
        "written from the test scenes; a relation query's scene size: the fewest objects of a "
        "scene that satisfies it",
        f"- hardware: {hardware}; date: {time.strftime('%Y-%m-%d')}",
        "",
        "| scene queries | n | top hit satisfies (%) | one of the top five (%) |",
        "|---|---|---|---|",
    ]
    for name, rates in measured["scene_queries"].items():
        lines.append(f"| {name} | {rates['n']} | {rates['@1']:.1f} | {rates['@5']:.1f} |")
    lines += [
        "",
        "| test captions, own image | n | R@1 | R@5 |",
        "|---|---|---|---|",
    ]
    for name, rates in measured["test_captions"].items():
        lines.append(f"| {name} | {rates['n']} | {rates['@1']:.1f} | {rates['@5']:.1f} |")
    return "\n".join(lines) + "\n"


@click.command("scenes", context_settings={"help_option_names": ["-h", "--help"]})
@run_options("Synthetic corpus folder (images.csv, dataset.json).")
def scenes_bench(run: Path, corpus: Path | None, threads: int | None, out: Path | None) -> None:
    """The demo's scene queries over every image of a run's synthetic corpus, split by query
    kind and by the size of the scenes a relation query describes, beside each test caption's
    own-image recall by object count. Prints markdown tables."""
    checkpoint = run_checkpoint(run, threads)
    measured = measure(checkpoint, corpus)
    command = f"cots bench scenes --run {run} --corpus {measured['corpus']}"
    text = render(measured, command + (f" --threads {threads}" if threads else ""), hardware())
    emit(text, measured, out)
