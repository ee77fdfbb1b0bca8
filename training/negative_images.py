"""Hard negative *images*: for each training image, the other training images that one of its
captions' hard negatives describes.

A hard negative caption ("a small purple circle on the right" for an image of a small purple
square) teaches image->text only: it has no image, so no text query ever meets it. When another
training image has that very caption, it is the image the query must not pick, and putting the
two in one batch teaches both directions at no extra cost a step (no caption more through the
text tower). Data flow: every caption of every training image -> its hard negatives
(:class:`training.training_data.CaptionNegatives`, the same words lists and kinds the run's
negatives use, nothing from scene specs) -> a word key (its words, lower-cased, in sorted
order, so "at the right side there is a little purple circle" and its reordering meet) ->
the images that own a caption with that key -> ``twins[i]``, which
``EpochBatches(twins=..., twin_share=...)`` puts beside item i. On a real corpus only captions
that differ by one attribute find each other; :func:`twin_coverage` says how many did.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from training.training_data import CaptionNegatives

_WORD = re.compile(r"[a-z]+")


def word_key(text: str) -> tuple[str, ...]:
    """The caption's words, lower-cased and sorted: captions that say the same words in
    another order (or with other punctuation) share a key."""
    return tuple(sorted(_WORD.findall(text.lower())))


def negative_image_twins(
    captions: Sequence[Sequence[str]], negatives: CaptionNegatives
) -> list[list[int]]:
    """Per item, the sorted indices of the other items that own a caption equal (by
    :func:`word_key`) to a hard negative of one of the item's captions."""
    owners: dict[tuple[str, ...], set[int]] = {}
    for index, item in enumerate(captions):
        for caption in item:
            owners.setdefault(word_key(caption), set()).add(index)
    twins: list[list[int]] = []
    for index, item in enumerate(captions):
        found: set[int] = set()
        for caption in item:
            for negative in negatives.every(caption):
                found |= owners.get(word_key(negative), set())
        found.discard(index)
        twins.append(sorted(found))
    return twins


def twin_coverage(twins: Sequence[Sequence[int]]) -> float:
    """The share of items (0..1) that have at least one hard negative image."""
    return sum(1 for t in twins if t) / max(1, len(twins))
