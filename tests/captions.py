"""A small parser for the synthetic captions, used to check them against the scenes."""

from __future__ import annotations

import re

from model.data.synth.vocabulary import COLOURS, SHAPES, SIZE_WORDS

_SIZE_OF = {word: size for size, words in SIZE_WORDS.items() for word in words}
_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_Z = "|".join(_SIZE_OF)
_FULL = re.compile(rf"\b(?:({_Z}) ({_C}) ({_S})|({_C}) ({_S}) that is ({_Z}))\b")
_PAIR = re.compile(rf"\b({_C}) ({_S})\b")


def objects_in(caption: str) -> set[tuple[str, str, str]]:
    """The (size, colour, shape) objects a caption introduces."""
    found = set()
    for m in _FULL.finditer(caption):
        if m.group(1):
            found.add((_SIZE_OF[m.group(1)], m.group(2), m.group(3)))
        else:
            found.add((_SIZE_OF[m.group(6)], m.group(4), m.group(5)))
    return found


def colour_shape_pairs(caption: str) -> set[tuple[str, str]]:
    """Every colour-shape pair a caption mentions, introductions and back-references alike."""
    return {(m.group(1), m.group(2)) for m in _PAIR.finditer(caption)}
