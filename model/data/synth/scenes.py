"""Random scenes of 1-3 objects, and captions that describe them exactly.

Every caption names the size, colour and shape of every object and how the objects are
arranged (a grid position for one object, pairwise relations for more), so swapping any
attribute in a caption describes a different scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np

from model.data.synth.vocabulary import (
    BACKGROUND_PHRASES,
    BACKGROUNDS,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_PHRASES,
    RELATIONS,
    SIZE_WORDS,
    SIZES,
    ColourShape,
)

# Cell centres as fractions of the side; not 1/6..5/6, so large objects stay inside the frame.
_CELL_CENTRES: Final = (0.2, 0.5, 0.8)
_JITTER: Final = 0.03
_GAP: Final = 0.02


@dataclass(frozen=True, slots=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, column) in the 3x3 grid
    centre: tuple[float, float]  # (x, y), fractions of the side

    @property
    def diameter(self) -> float:
        return SIZES[self.size]


@dataclass(frozen=True, slots=True)
class Relation:
    subject: int  # index into Scene.objects
    relation: str  # key of RELATIONS: subject is <relation> reference
    reference: int


@dataclass(frozen=True, slots=True)
class Scene:
    objects: tuple[SceneObject, ...]
    relations: tuple[Relation, ...]
    background: str
    tone: tuple[int, int, int]  # base background colour, dark and muted


def _choose(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _true_relations(a: SceneObject, b: SceneObject) -> list[str]:
    """Relations of ``a`` to ``b`` that hold by grid cell (jitter never crosses a cell)."""
    (row_a, col_a), (row_b, col_b) = a.cell, b.cell
    found = []
    if col_a < col_b:
        found.append("left of")
    if col_a > col_b:
        found.append("right of")
    if row_a < row_b:
        found.append("above")
    if row_a > row_b:
        found.append("below")
    return found


def _place(rng: np.random.Generator, sizes: list[str]) -> list[tuple[tuple[int, int], tuple]]:
    """Distinct grid cells with jittered centres such that no two objects overlap."""
    cells = list(POSITIONS)
    for attempt in range(50):
        jitter = _JITTER if attempt < 40 else 0.0
        picks = rng.choice(len(cells), size=len(sizes), replace=False)
        placed = []
        for pick in picks:
            row, col = cells[int(pick)]
            dx, dy = rng.uniform(-jitter, jitter, size=2)
            placed.append(((row, col), (_CELL_CENTRES[col] + dx, _CELL_CENTRES[row] + dy)))
        if all(
            np.hypot(p[1][0] - q[1][0], p[1][1] - q[1][1])
            > (SIZES[sizes[i]] + SIZES[sizes[j]]) / 2 + _GAP
            for i, p in enumerate(placed)
            for j, q in enumerate(placed)
            if i < j
        ):
            return placed
    raise RuntimeError("could not place objects without overlap")  # unreachable: cells are apart


def background_tone(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = int(rng.integers(30, 96))
    tint = rng.integers(-14, 15, size=3)
    return tuple(int(np.clip(grey + t, 0, 255)) for t in tint)  # type: ignore[return-value]


def sample_scene(
    rng: np.random.Generator,
    allowed: list[ColourShape],
    required: list[ColourShape] | None = None,
) -> Scene:
    """A scene of 1-3 objects with distinct colour-shape pairs drawn from ``allowed``.

    With ``required``, the first object is drawn from it (the held-out split uses this so each
    of its scenes contains at least one held-out combination).
    """
    n = int(rng.integers(1, 4))
    pairs: list[ColourShape] = []
    if required:
        pairs.append(required[int(rng.integers(len(required)))])
    while len(pairs) < n:
        pair = allowed[int(rng.integers(len(allowed)))]
        if pair not in pairs:
            pairs.append(pair)
    sizes = [_choose(rng, list(SIZES)) for _ in pairs]
    placed = _place(rng, sizes)
    objects = tuple(
        SceneObject(shape=shape, colour=colour, size=size, cell=cell, centre=centre)
        for (colour, shape), size, (cell, centre) in zip(pairs, sizes, placed, strict=True)
    )
    relations: list[Relation] = []
    if n >= 2:
        # Object 1 is the reference the others are placed against.
        for subject in (0, 2)[: n - 1]:
            options = _true_relations(objects[subject], objects[1])
            relations.append(Relation(subject, _choose(rng, options), 1))
    return Scene(
        objects=objects,
        relations=tuple(relations),
        background=_choose(rng, BACKGROUNDS),
        tone=background_tone(rng),
    )


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def object_phrase(rng: np.random.Generator, obj: SceneObject) -> str:
    size = _choose(rng, SIZE_WORDS[obj.size])
    if rng.random() < 0.25:
        return f"{article(obj.colour)} {obj.colour} {obj.shape} that is {size}"
    return f"{article(size)} {size} {obj.colour} {obj.shape}"


def short_phrase(obj: SceneObject) -> str:
    """A reference to an object already introduced; colour-shape pairs are unique in a scene."""
    return f"the {obj.colour} {obj.shape}"


def _caption_one(rng: np.random.Generator, scene: Scene, template: int) -> str:
    (obj,) = scene.objects
    o = object_phrase(rng, obj)
    p = _choose(rng, POSITION_PHRASES[POSITIONS[obj.cell]])
    return [
        f"{o} {p}",
        f"there is {o} {p}",
        f"a picture of {o} {p}",
        f"{p} there is {o}",
        f"an image with {o} placed {p}",
    ][template]


def _caption_two(rng: np.random.Generator, scene: Scene, template: int) -> str:
    (rel,) = scene.relations
    sa, sb = scene.objects[rel.subject], scene.objects[rel.reference]
    a, b = object_phrase(rng, sa), object_phrase(rng, sb)
    r = _choose(rng, RELATION_PHRASES[rel.relation])
    converse = _choose(rng, RELATION_PHRASES[RELATIONS[rel.relation]])
    return [
        f"{a} {r} {b}",
        f"{b} {converse} {a}",
        f"there is {a} {r} {b}",
        f"{a} and {b}; {short_phrase(sa)} is {r} {short_phrase(sb)}",
        f"an image of {b} with {a} {r} it",
    ][template]


def _caption_three(rng: np.random.Generator, scene: Scene, template: int) -> str:
    rel_a, rel_c = scene.relations
    sa, sb, sc = (scene.objects[i] for i in (rel_a.subject, rel_a.reference, rel_c.subject))
    a, b, c = object_phrase(rng, sa), object_phrase(rng, sb), object_phrase(rng, sc)
    ra = _choose(rng, RELATION_PHRASES[rel_a.relation])
    rc = _choose(rng, RELATION_PHRASES[rel_c.relation])
    ref = short_phrase(sb)
    return [
        f"{a} {ra} {b}, and {c} {rc} {ref}",
        f"{c} {rc} {b}, and {a} {ra} {ref}",
        f"{b} with {a} {ra} it and {c} {rc} it",
        f"there is {a} {ra} {b}, and {c} {rc} {ref}",
        f"three objects: {a}, {b} and {c}; {short_phrase(sa)} is {ra} {ref} "
        f"and {short_phrase(sc)} is {rc} {ref}",
    ][template]


_CAPTIONERS: Final = (_caption_one, _caption_two, _caption_three)
N_TEMPLATES: Final = 5


def caption_scene(rng: np.random.Generator, scene: Scene, n_captions: int) -> list[str]:
    """Up to ``n_captions`` distinct captions from different templates; some name the background."""
    captioner = _CAPTIONERS[len(scene.objects) - 1]
    templates = rng.permutation(N_TEMPLATES)
    captions: list[str] = []
    for i in range(n_captions):
        text = captioner(rng, scene, int(templates[i % N_TEMPLATES]))
        if rng.random() < 0.3:
            text += f", on {_choose(rng, BACKGROUND_PHRASES[scene.background])} background"
        if text not in captions:
            captions.append(text)
    return captions
