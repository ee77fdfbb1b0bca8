"""The attributes of the synthetic world and the words that name them.

Every attribute value has one canonical name (used in ``dataset.json`` and by the caption
parser in the tests) and a few paraphrases used by the caption templates.
"""

from __future__ import annotations

from typing import Final

import numpy as np

SHAPES: Final = ("circle", "square", "triangle", "diamond", "star", "cross", "ring", "heart")

# Saturated, well-separated colours; backgrounds are kept dark and muted so every colour,
# white included, stands out from them.
COLOURS: Final[dict[str, tuple[int, int, int]]] = {
    "red": (222, 38, 38),
    "green": (40, 176, 64),
    "blue": (44, 90, 230),
    "yellow": (242, 222, 36),
    "purple": (146, 64, 200),
    "orange": (248, 142, 28),
    "cyan": (40, 214, 222),
    "pink": (250, 138, 196),
    "white": (246, 246, 246),
    "brown": (150, 92, 44),
}

# Diameter of an object as a fraction of the image side.
SIZES: Final[dict[str, float]] = {"small": 0.17, "large": 0.29}

SIZE_WORDS: Final[dict[str, tuple[str, ...]]] = {
    "small": ("small", "little", "tiny"),
    "large": ("large", "big"),
}

# A 3x3 grid of positions, (row, column) -> canonical name.
POSITIONS: Final[dict[tuple[int, int], str]] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}

POSITION_PHRASES: Final[dict[str, tuple[str, ...]]] = {
    "top left": ("in the top left corner", "at the upper left"),
    "top": ("at the top", "in the upper middle"),
    "top right": ("in the top right corner", "at the upper right"),
    "left": ("on the left", "at the left side"),
    "center": ("in the center", "in the middle"),
    "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left corner", "at the lower left"),
    "bottom": ("at the bottom", "in the lower middle"),
    "bottom right": ("in the bottom right corner", "at the lower right"),
}

# Relation of object A to object B, and its converse (B to A).
RELATIONS: Final[dict[str, str]] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}

RELATION_PHRASES: Final[dict[str, tuple[str, ...]]] = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}

BACKGROUNDS: Final = ("plain", "striped", "checkered", "dotted", "gradient")

BACKGROUND_PHRASES: Final[dict[str, tuple[str, ...]]] = {
    "plain": ("a plain", "a uniform"),
    "striped": ("a striped",),
    "checkered": ("a checkered", "a checkerboard"),
    "dotted": ("a dotted", "a polka-dot"),
    "gradient": ("a gradient", "a shaded"),
}

ColourShape = tuple[str, str]


def all_combinations() -> list[ColourShape]:
    return [(colour, shape) for colour in COLOURS for shape in SHAPES]


def choose_heldout_combinations(seed: int, n: int) -> list[ColourShape]:
    """Colour-shape pairs that never occur in train, val or test.

    Each held-out pair uses a different colour and a different shape, so every colour and
    every shape is still seen in training with most partners: the held-out split tests
    composition, not unseen words.
    """
    if not 0 <= n <= min(len(COLOURS), len(SHAPES)):
        raise ValueError(
            f"n_heldout_combinations must be in 0..{min(len(COLOURS), len(SHAPES))}, got {n}"
        )
    rng = np.random.default_rng([seed, 0x4E1D])
    colours = [str(c) for c in rng.permutation(list(COLOURS))[:n]]
    shapes = [str(s) for s in rng.permutation(list(SHAPES))[:n]]
    return sorted(zip(colours, shapes, strict=True))
