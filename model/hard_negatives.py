"""Hard negative captions for attribute binding, written from word lists (NegCLIP-style).

Contrastive towers trained on captions whose in-batch negatives differ in many words learn to
match words, not which attribute belongs to which object (Yuksekgonul et al., ICLR 2023). A
hard negative is the caption itself with one thing changed, so only that thing tells them apart.

Data flow: :func:`hard_negatives` splits a caption into words and separators (rejoining them
gives the caption back), looks each word up in the word lists below, and writes every caption
that differs from it in exactly one attribute or relation:

- ``colour`` / ``shape`` / ``size``: one object's attribute replaced by another value of its
  kind (a size by the opposite size);
- ``position``: one absolute place word replaced by its opposite (top/bottom, left/right,
  upper/lower) where no "of" follows;
- ``relation``: one relation word replaced by its converse (above/below, over/under,
  left of/right of);
- ``binding``: two objects exchange their values of one attribute ("a red circle and a blue
  square" -> "a blue circle and a red square");
- ``motion``: a change in time turned around: a motion word replaced by its opposite (rises/
  falls, upwards/downwards, grows/shrinks, leftwards/rightwards), or the two ends of "from X to
  Y" or "starts X and ends Y" exchanged ("changes from red to blue" -> "from blue to red").

An object's attribute is identified by its value and its head word (the noun after a colour or
size; the colour before a shape), and is changed at every mention, so "a red circle ... the red
circle" becomes "a green circle ... the green circle", never a caption that contradicts itself.
Nothing here reads the synthetic generator's scene specs: the word lists are English, so the
transform applies to any corpus's captions, and :func:`coverage` says which share of a caption
set it can transform. Captions with nothing to swap yield no negatives.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from model.config import NEGATIVE_KINDS, NegativeKind

COLOURS: Final = (
    "red",
    "green",
    "blue",
    "yellow",
    "purple",
    "orange",
    "cyan",
    "pink",
    "white",
    "brown",
    "black",
    "grey",
    "gray",
)
SHAPES: Final = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "cross",
    "ring",
    "heart",
    "rectangle",
    "oval",
    "hexagon",
)
SMALL_WORDS: Final = ("small", "little", "tiny")
LARGE_WORDS: Final = ("large", "big", "huge")
# The opposite of each size word, in the same register.
SIZE_OPPOSITE: Final = {
    "small": "large",
    "little": "big",
    "tiny": "huge",
    "large": "small",
    "big": "little",
    "huge": "tiny",
}
# Absolute places: one word swapped for its opposite ("in the top left corner" -> "bottom").
POSITION_OPPOSITE: Final = {
    "top": "bottom",
    "bottom": "top",
    "upper": "lower",
    "lower": "upper",
    "left": "right",
    "right": "left",
}
# Relations between two objects: each word and its converse; "left"/"right" are relations when
# "of" follows ("to the left of").
RELATION_CONVERSE: Final = {
    "above": "below",
    "below": "above",
    "over": "under",
    "under": "over",
    "beneath": "above",
    "underneath": "above",
}
# Motions and changes: each word and its opposite in time.
MOTION_OPPOSITE: Final = {
    "up": "down",
    "down": "up",
    "upwards": "downwards",
    "downwards": "upwards",
    "upward": "downward",
    "downward": "upward",
    "leftwards": "rightwards",
    "rightwards": "leftwards",
    "rises": "falls",
    "falls": "rises",
    "rising": "falling",
    "falling": "rising",
    "grows": "shrinks",
    "shrinks": "grows",
    "growing": "shrinking",
    "shrinking": "growing",
    "bigger": "smaller",
    "smaller": "bigger",
    "expands": "contracts",
    "contracts": "expands",
}
# "from X to Y" and "starts X and ends Y": the two ends of a change, exchanged.
_ENDS: Final = (("from", "to"), ("starts", "ends"))
_SKIPPED: Final = frozenset(("the", "a", "an", "and"))
_SIDES: Final = ("left", "right")
_ATTRIBUTE_WORDS: Final = frozenset((*COLOURS, *SMALL_WORDS, *LARGE_WORDS))
_PIECES: Final = re.compile(r"[A-Za-z]+|[^A-Za-z]+")
# How far (in words) an attribute looks for its head word.
_REACH: Final = 3


@dataclass(frozen=True)
class Negative:
    text: str
    kind: NegativeKind


@dataclass(frozen=True)
class _Mention:
    """One attribute word of the caption: its piece index, kind, value and head word."""

    piece: int
    kind: str  # "colour", "shape" or "size"
    value: str
    head: str | None


def _size_class(word: str) -> str:
    return "small" if word in SMALL_WORDS else "large"


def _with_case(template: str, word: str) -> str:
    return word.capitalize() if template[:1].isupper() else word


class _Caption:
    """A caption as pieces (words and separators) with the word pieces' lower-case forms."""

    def __init__(self, caption: str) -> None:
        self.pieces = _PIECES.findall(caption)
        self.words = [
            (i, piece.lower()) for i, piece in enumerate(self.pieces) if piece[:1].isalpha()
        ]

    def replaced(self, changes: dict[int, str]) -> str:
        """The caption with word pieces replaced, and an article before a replaced word made
        to fit it ("a red circle" -> "an orange circle", not "a orange circle", which no true
        caption says and a model would learn to spot)."""
        changes = dict(changes)
        for (previous, before), (piece, _) in zip(self.words, self.words[1:], strict=False):
            if piece in changes and before in ("a", "an"):
                changes[previous] = "an" if changes[piece][0] in "aeiou" else "a"
        return "".join(
            _with_case(piece, changes[i]) if i in changes else piece
            for i, piece in enumerate(self.pieces)
        )

    def mentions(self) -> list[_Mention]:
        found = []
        for n, (piece, word) in enumerate(self.words):
            if word in COLOURS or word in SMALL_WORDS or word in LARGE_WORDS:
                kind = "colour" if word in COLOURS else "size"
                after = [w for _, w in self.words[n + 1 : n + 1 + _REACH]]
                head = next((w for w in after if w not in _ATTRIBUTE_WORDS), None)
                found.append(_Mention(piece, kind, word, head))
            elif word in SHAPES:
                before = [w for _, w in self.words[max(0, n - 2) : n]]
                colour = next((w for w in reversed(before) if w in COLOURS), None)
                found.append(_Mention(piece, "shape", word, colour))
        return found


def _objects(mentions: Iterable[_Mention], kind: str) -> dict[tuple[str, str | None], list[int]]:
    """Mentions of one kind grouped into objects: (value, head) -> piece indices."""
    grouped: dict[tuple[str, str | None], list[int]] = {}
    for mention in mentions:
        if mention.kind == kind:
            grouped.setdefault((mention.value, mention.head), []).append(mention.piece)
    return grouped


def _replacements(kind: str, value: str, present: set[str]) -> list[str]:
    if kind == "size":
        return [SIZE_OPPOSITE[value]]
    values = COLOURS if kind == "colour" else SHAPES
    # Not a value the caption already has: that would blur a replacement into a binding swap;
    # "grey" and "gray" are one colour.
    taken = present | ({"grey", "gray"} if present & {"grey", "gray"} else set())
    return [v for v in values if v not in taken and v != "gray"]


def _attribute_negatives(caption: _Caption, mentions: list[_Mention]) -> list[Negative]:
    negatives = []
    for kind in ("colour", "shape", "size"):
        objects = _objects(mentions, kind)
        present = {value for value, _ in objects}
        for (value, _), pieces in objects.items():
            for new in _replacements(kind, value, present):
                text = caption.replaced(dict.fromkeys(pieces, new))
                negatives.append(Negative(text, kind))  # type: ignore[arg-type]
        # Binding: two objects with different values and different heads exchange values.
        keys = list(objects)
        for a in range(len(keys)):
            for b in range(a + 1, len(keys)):
                (value_a, head_a), (value_b, head_b) = keys[a], keys[b]
                differ = (
                    _size_class(value_a) != _size_class(value_b)
                    if kind == "size"
                    else value_a != value_b
                )
                if not differ or head_a == head_b:
                    continue
                changes = dict.fromkeys(objects[keys[a]], value_b)
                changes.update(dict.fromkeys(objects[keys[b]], value_a))
                negatives.append(Negative(caption.replaced(changes), "binding"))
    return negatives


def _spatial_negatives(caption: _Caption) -> list[Negative]:
    negatives = []
    words = caption.words
    for n, (piece, word) in enumerate(words):
        following = words[n + 1][1] if n + 1 < len(words) else None
        if word in _SIDES and following == "of":
            negatives.append(
                Negative(caption.replaced({piece: POSITION_OPPOSITE[word]}), "relation")
            )
        elif word in RELATION_CONVERSE:
            negatives.append(
                Negative(caption.replaced({piece: RELATION_CONVERSE[word]}), "relation")
            )
        elif word in POSITION_OPPOSITE:
            negatives.append(
                Negative(caption.replaced({piece: POSITION_OPPOSITE[word]}), "position")
            )
    return negatives


def _motion_negatives(caption: _Caption) -> list[Negative]:
    return [Negative(caption.replaced(changes), "motion") for changes in _time_changes(caption)]


def _time_changes(caption: _Caption) -> list[dict[int, str]]:
    """Each change in time the caption names, as the word replacements that turn it around:
    a motion word by its opposite, or the two ends of a change exchanged."""
    found = []
    words = caption.words
    for piece, word in words:
        if word in MOTION_OPPOSITE:
            found.append({piece: MOTION_OPPOSITE[word]})
    for start, end in _ENDS:
        for n, (_, word) in enumerate(words):
            if word != start:
                continue
            # the first word after ``start`` and after the next ``end`` (articles skipped)
            after = [(p, w) for p, w in words[n + 1 :] if w not in _SKIPPED]
            if not after or after[0][1] == end:
                continue
            first = after[0]
            rest = [w for w in after[1:]]
            if end not in [w for _, w in rest]:
                continue
            second = rest[[w for _, w in rest].index(end) + 1 :][:1]
            if second and second[0][1] != first[1]:
                found.append({first[0]: second[0][1], second[0][0]: first[1]})
    return found


def _turns_change(caption: _Caption) -> dict[int, str] | None:
    """ "a blue cross turns white" -> {blue: white, white: blue}: the colour an object is named
    with and the one it turns, exchanged; None when the caption has no such change."""
    words = caption.words
    for n, (_, word) in enumerate(words):
        following = words[n + 1 : n + 2]
        if word != "turns" or not following or following[0][1] not in COLOURS:
            continue
        before = [(p, w) for p, w in words[:n] if w in COLOURS]
        if before and before[-1][1] != following[0][1]:
            (first, old), (second, new) = before[-1], following[0]
            return {first: new, second: old}
    return None


def time_reversed(caption: str) -> str | None:
    """The caption of the same clip played backwards: every change in time it names turned
    around at once ("expands from small to large" -> "contracts from large to small", "a blue
    cross turns white" -> "a white cross turns blue"), or None when it names no change in time
    (a still scene reads the same both ways) or two changes touch the same word."""
    parsed = _Caption(caption)
    changes = _time_changes(parsed)
    turns = _turns_change(parsed)
    if turns is not None:
        changes.append(turns)
    merged: dict[int, str] = {}
    for change in changes:
        if merged.keys() & change.keys():
            return None
        merged |= change
    return parsed.replaced(merged) if merged else None


def hard_negatives(caption: str, kinds: Sequence[NegativeKind] = NEGATIVE_KINDS) -> list[Negative]:
    """Every caption that differs from ``caption`` in exactly one attribute or relation, of the
    given kinds, each once, in a fixed order; [] when it has nothing to swap."""
    parsed = _Caption(caption)
    found = _attribute_negatives(parsed, parsed.mentions()) + _spatial_negatives(parsed)
    found += _motion_negatives(parsed)
    seen = {caption.lower()}
    negatives = []
    for negative in found:
        if negative.kind in kinds and negative.text.lower() not in seen:
            seen.add(negative.text.lower())
            negatives.append(negative)
    return negatives


def coverage(
    captions: Iterable[str], kinds: Sequence[NegativeKind] = NEGATIVE_KINDS
) -> dict[str, float]:
    """How much of a caption set the transform can use: the share (%) of captions with at
    least one negative (``any``) and with one of each kind."""
    total = 0
    counts = dict.fromkeys(["any", *kinds], 0)
    for caption in captions:
        total += 1
        found = {negative.kind for negative in hard_negatives(caption, kinds)}
        counts["any"] += bool(found)
        for kind in found:
            counts[kind] += 1
    return {kind: 100.0 * count / max(total, 1) for kind, count in counts.items()}
