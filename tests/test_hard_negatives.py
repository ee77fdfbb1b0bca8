"""The hard negative caption transform (model/hard_negatives.py), on hand-written captions.

Each negative is checked by a word diff written independently of the transform: apart from an
article fitted to its noun, the words that changed must form one substitution (x -> y, at every
mention of one object) between two words of one kind, or one exchange (x <-> y) for a binding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from cots.cli import cli
from model.config import HardNegativeConfig
from model.hard_negatives import (
    COLOURS,
    LARGE_WORDS,
    MOTION_OPPOSITE,
    POSITION_OPPOSITE,
    RELATION_CONVERSE,
    SHAPES,
    SMALL_WORDS,
    coverage,
    hard_negatives,
    time_reversed,
)
from training.training_data import CaptionNegatives

_KIND_WORDS = {
    "colour": set(COLOURS),
    "shape": set(SHAPES),
    "size": {*SMALL_WORDS, *LARGE_WORDS},
    "position": set(POSITION_OPPOSITE),
    "relation": {*RELATION_CONVERSE, "left", "right"},
    "motion": set(MOTION_OPPOSITE),
}

HAND_WRITTEN = [
    "a small red circle in the top left corner",
    "a big red circle to the left of a small blue square",
    "a red circle and a blue square; the red circle is left of the blue square",
    "an orange star that is tiny, at the lower right",
    "a large cyan ring above a small white star, and a big pink heart below the white star",
    # captions a user's corpus might have
    "A man in a red shirt stands next to a blue car",
    "two black dogs sleeping under a wooden table",
    "a little girl holding a big yellow balloon on the left side of the street",
    # video captions: motions and changes in time
    "a small red circle moves from left to right",
    "a red heart rises upwards",
    "a green ring travels rightwards, while a small white star stays still",
    "a big blue square grows",
    "a man walks up the stairs",
]
NOTHING_TO_SWAP = [
    "a dog running on the beach",
    "people waiting for a train at night",
    "a bowl of soup with fresh bread",
    "",
]


def _substitutions(caption: str, negative: str) -> set[tuple[str, str]]:
    before, after = caption.lower().split(), negative.lower().split()
    assert len(before) == len(after), (caption, negative)
    changed = {
        (a.strip(",;"), b.strip(",;"))
        for a, b in zip(before, after, strict=True)
        if a != b and {a, b} != {"a", "an"}
    }
    return changed


def _kind_of(words: set[str]) -> set[str]:
    return {kind for kind, vocabulary in _KIND_WORDS.items() if words <= vocabulary}


@pytest.mark.parametrize("caption", HAND_WRITTEN)
def test_each_negative_changes_exactly_one_attribute_or_relation(caption: str) -> None:
    negatives = hard_negatives(caption)
    assert negatives, caption
    for negative in negatives:
        changed = _substitutions(caption, negative.text)
        words = {word for pair in changed for word in pair}
        if negative.kind == "binding" or (negative.kind == "motion" and len(changed) == 2):
            # one exchange between two objects (or the two ends of a change): x -> y and
            # y -> x, nothing else
            assert len(changed) == 2, (caption, negative)
            (x, y), (y2, x2) = sorted(changed)
            assert (x, y) == (x2, y2), (caption, negative)
            continue
        else:
            assert len(changed) == 1, (caption, negative)
            assert negative.kind in _kind_of(words), (caption, negative)
        assert _kind_of(words), (caption, negative)
        assert negative.text != caption


def test_negatives_of_a_hand_written_caption_are_the_expected_ones() -> None:
    texts = {
        (n.kind, n.text) for n in hard_negatives("a big red circle left of a small blue square")
    }
    assert ("relation", "a big red circle right of a small blue square") in texts
    assert ("binding", "a big blue circle left of a small red square") in texts
    assert ("binding", "a big red square left of a small blue circle") in texts
    assert ("binding", "a small red circle left of a big blue square") in texts
    assert ("size", "a little red circle left of a small blue square") in texts
    assert ("colour", "a big green circle left of a small blue square") in texts
    assert ("shape", "a big red star left of a small blue square") in texts
    # a colour the caption already names is a binding swap, never a replacement
    assert ("colour", "a big blue circle left of a small blue square") not in texts
    places = {n.text for n in hard_negatives("a small red circle in the top left corner")}
    assert "a small red circle in the bottom left corner" in places
    assert "a small red circle in the top right corner" in places


def test_every_mention_of_an_object_changes_together() -> None:
    caption = "a red circle and a blue square; the red circle is left of the blue square"
    texts = {n.text for n in hard_negatives(caption)}
    assert "a green circle and a blue square; the green circle is left of the blue square" in texts
    assert not any("a green circle and a blue square; the red circle" in t for t in texts)
    # two objects that share a colour are two objects: one of them changes
    texts = {n.text for n in hard_negatives("two red cars parked near a red house")}
    assert "two green cars parked near a red house" in texts
    assert "two red cars parked near a green house" in texts


def test_articles_fit_the_new_word() -> None:
    texts = {n.text for n in hard_negatives("a red circle")}
    assert "an orange circle" in texts
    assert not any(t.startswith("a orange") for t in texts)
    assert "A green circle" in {n.text for n in hard_negatives("An orange circle")}


@pytest.mark.parametrize("caption", NOTHING_TO_SWAP)
def test_a_caption_with_nothing_to_swap_yields_none(caption: str) -> None:
    assert hard_negatives(caption) == []


def test_kinds_select_and_coverage_counts() -> None:
    only = hard_negatives("a big red circle left of a small blue square", kinds=["relation"])
    assert [n.kind for n in only] == ["relation"]
    report = coverage([*HAND_WRITTEN, *NOTHING_TO_SWAP])
    total = len(HAND_WRITTEN) + len(NOTHING_TO_SWAP)
    assert report["any"] == pytest.approx(100 * len(HAND_WRITTEN) / total)
    assert report["binding"] > 0
    assert report["relation"] > 0


def test_training_picks_are_deterministic_and_respect_the_fraction() -> None:
    picker = CaptionNegatives(HardNegativeConfig(enabled=True, fraction=0.5))
    caption = "a big red circle left of a small blue square"
    assert picker.pick(caption, 0.7) == ""  # above the fraction: no negative
    assert picker.pick("a dog on the beach", 0.1) == ""  # nothing to swap
    picked = {picker.pick(caption, draw / 100) for draw in range(50)}
    kinds = {n.text: n.kind for n in hard_negatives(caption)}
    assert picked <= set(kinds)
    # draws spread over the kinds, not only the most numerous (colour)
    assert {kinds[text] for text in picked} == set(kinds.values())
    assert picker.pick(caption, 0.3) == picker.pick(caption, 0.3)


def test_motions_and_changes_turn_around() -> None:
    def motions(caption: str) -> set[str]:
        return {n.text for n in hard_negatives(caption, kinds=["motion"])}

    assert motions("a small red circle moves from left to right") == {
        "a small red circle moves from right to left"
    }
    assert motions("a blue square moves from the top to the bottom") == {
        "a blue square moves from the bottom to the top"
    }
    assert "a red heart falls upwards" in motions("a red heart rises upwards")
    assert "a red heart rises downwards" in motions("a red heart rises upwards")
    assert motions("a big blue square grows") == {"a big blue square shrinks"}
    # a change of colour turns around as an exchange of its two ends (a binding of colours)
    texts = {n.text for n in hard_negatives("a big star changes from red to blue")}
    assert "a big star changes from blue to red" in texts


def test_time_reversed_turns_every_change_around_at_once() -> None:
    # several changes of one clip turn together, so the result stays true of the reversed clip
    assert time_reversed("a square expands from small to large") == (
        "a square contracts from large to small"
    )
    assert time_reversed("A red balloon rises upwards, next to a tree that does not move") == (
        "A red balloon falls downwards, next to a tree that does not move"
    )
    assert time_reversed("a little star that starts white and ends purple") == (
        "a little star that starts purple and ends white"
    )
    # "turns": the colour it is named with and the one it turns are exchanged, article fitted
    assert time_reversed("an orange cat turns grey") == "a grey cat turns orange"
    assert time_reversed("a man walks from left to right") == "a man walks from right to left"
    # nothing changes in time, nothing to exchange, or a change the word lists do not know
    # ("to the right" is also a place): no reversed caption
    for still in (
        "a red circle on the left",
        "the sky turns dark",
        "a blue ball turns blue",
        "a dog sleeping under a table",
        "a blue square slides to the right",
    ):
        assert time_reversed(still) is None, still


def test_cots_negatives_reports_the_coverage_of_a_users_captions(tmp_path: Path) -> None:
    rows = ["filepath,caption,image_id,split"]
    for i, caption in enumerate([*HAND_WRITTEN[5:8], *NOTHING_TO_SWAP[:2]]):
        rows.append(f"img{i}.jpg,{caption},{i},train")
        (tmp_path / f"img{i}.jpg").write_bytes(b"")  # captions only: pixels are never read
    csv_path = tmp_path / "captions.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(cli, ["negatives", str(csv_path), "--show", "1"])
    assert result.exit_code == 0, result.output
    assert "5 captions; with a negative: 60.0 %" in result.output
    assert "A man in a red shirt stands next to a blue car" in result.output
    assert "binding   'A man in a blue shirt stands next to a red car'" in result.output
    missing = CliRunner().invoke(cli, ["negatives", str(tmp_path / "nothing.csv")])
    assert missing.exit_code != 0
    assert "Traceback" not in missing.output
