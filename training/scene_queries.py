"""Queries a person would type, written from scene specs, and whether the top hits satisfy them.

Data flow: :func:`write_queries` takes the ground-truth scenes of a gallery (for the synthetic
corpus, ``model.data.synth.image_scenes``), picks scenes with a seeded generator and writes one
query per pick from a part of the scene, in words of its own (not a corpus caption):

- one object and its place in the 3x3 grid: "a large red circle on the left";
- two objects and a true relation between them: "a small blue star above a big green square";
- one object alone: "a big white heart".

Each :class:`SceneQuery` keeps its constraints. :func:`satisfies` checks a scene against them
(the objects must be present, distinct, in the named cell or relation), and :func:`score`
turns ranked gallery indices into the exact-match rate at 1 and 5, beside the oracle's rate
(the share of queries that some gallery scene satisfies at all). :func:`corpus_scenes`
recomputes the scenes of a synthetic corpus folder from its ``dataset.json``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import permutations
from pathlib import Path

import numpy as np

from model.data.synth import SynthConfig, image_scenes, read_dataset_json
from model.data.synth.scenes import Scene, SceneObject
from model.data.synth.vocabulary import POSITIONS

_SIZE_WORD = {"small": ("small", "little"), "large": ("large", "big")}
_PLACE_WORD = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the middle",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
_RELATION_WORD = {"left of": "left of", "right of": "right of", "above": "above", "below": "below"}
_OPENERS = ("", "", "a photo of ", "show me ", "find ")


@dataclass(frozen=True)
class Wanted:
    """One object a query asks for; ``cell`` None: anywhere."""

    size: str
    colour: str
    shape: str
    cell: tuple[int, int] | None = None

    def matches(self, obj: SceneObject) -> bool:
        return (obj.size, obj.colour, obj.shape) == (self.size, self.colour, self.shape) and (
            self.cell is None or obj.cell == self.cell
        )


@dataclass(frozen=True)
class SceneQuery:
    text: str
    kind: str  # "place", "relation" or "object"
    objects: tuple[Wanted, ...]
    relation: str | None = None  # objects[0] <relation> objects[1]


def _holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    (row_a, col_a), (row_b, col_b) = a.cell, b.cell
    return {
        "left of": col_a < col_b,
        "right of": col_a > col_b,
        "above": row_a < row_b,
        "below": row_a > row_b,
    }[relation]


def satisfies(scene: Scene, query: SceneQuery) -> bool:
    """Whether distinct objects of ``scene`` fill every wanted object (and the relation)."""
    for chosen in permutations(scene.objects, len(query.objects)):
        if not all(w.matches(o) for w, o in zip(query.objects, chosen, strict=True)):
            continue
        if query.relation is None or _holds(query.relation, chosen[0], chosen[1]):
            return True
    return False


def _phrase(rng: np.random.Generator, obj: SceneObject) -> str:
    size = _SIZE_WORD[obj.size][int(rng.integers(2))]
    return f"{'an' if size[0] in 'aeiou' else 'a'} {size} {obj.colour} {obj.shape}"


def _true_relations(a: SceneObject, b: SceneObject) -> list[str]:
    return [r for r in _RELATION_WORD if _holds(r, a, b)]


def write_query(rng: np.random.Generator, scene: Scene) -> SceneQuery:
    """One query about part of ``scene``: a relation where it has two objects (half the
    time), else an object in its place (three times in four) or an object alone."""
    opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
    objects = scene.objects
    if len(objects) >= 2 and rng.random() < 0.5:
        i, j = (int(k) for k in rng.choice(len(objects), size=2, replace=False))
        a, b = objects[i], objects[j]
        relation = str(rng.choice(_true_relations(a, b)))
        text = f"{opener}{_phrase(rng, a)} {_RELATION_WORD[relation]} {_phrase(rng, b)}"
        wanted = tuple(Wanted(o.size, o.colour, o.shape) for o in (a, b))
        return SceneQuery(text, "relation", wanted, relation)
    obj = objects[int(rng.integers(len(objects)))]
    if rng.random() < 0.75:
        place = _PLACE_WORD[POSITIONS[obj.cell]]
        wanted = (Wanted(obj.size, obj.colour, obj.shape, obj.cell),)
        return SceneQuery(f"{opener}{_phrase(rng, obj)} {place}", "place", wanted)
    return SceneQuery(
        f"{opener}{_phrase(rng, obj)}", "object", (Wanted(obj.size, obj.colour, obj.shape),)
    )


def write_queries(scenes: Sequence[Scene], n: int = 200, seed: int = 0) -> list[SceneQuery]:
    """``n`` distinct queries, each written from the scene of a randomly picked gallery item."""
    rng = np.random.default_rng([seed, 0x5CE7E])
    queries: dict[str, SceneQuery] = {}
    for _ in range(50 * n):
        if len(queries) == n:
            break
        query = write_query(rng, scenes[int(rng.integers(len(scenes)))])
        queries.setdefault(query.text, query)
    return list(queries.values())


def score(
    queries: Sequence[SceneQuery], scenes: Sequence[Scene], ranked: np.ndarray
) -> dict[str, float]:
    """Exact-match rates in % from ``ranked`` [Q, <=5] gallery indices, best first: the top
    hit satisfies the query (``scene_match@1``), one of the top five does (``@5``), and some
    gallery scene does at all (``scene_oracle``, the ceiling of both)."""
    if len(queries) == 0:
        raise ValueError("no queries to score")
    at1 = at5 = oracle = 0
    for query, row in zip(queries, ranked, strict=True):
        hits = [satisfies(scenes[int(i)], query) for i in row[:5]]
        at1 += hits[0]
        at5 += any(hits)
        oracle += any(satisfies(scene, query) for scene in scenes)
    n = len(queries) / 100
    return {"scene_match@1": at1 / n, "scene_match@5": at5 / n, "scene_oracle": oracle / n}


@cache
def corpus_scenes(corpus: Path) -> dict[str, Scene] | None:
    """Image id -> scene for a synthetic corpus folder; None for any other corpus."""
    description = read_dataset_json(corpus)
    if description is None:
        return None
    scenes = image_scenes(SynthConfig(**description["config"]))
    return {f"img{i:07d}": scene for i, (_, scene) in enumerate(scenes)}
