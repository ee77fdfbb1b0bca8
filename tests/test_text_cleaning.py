"""``clean_lower``'s shortcut past ftfy gives what the full cleaning gives."""

from __future__ import annotations

import html
import string

import ftfy
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.text import clean_lower


def full_cleaning(text: str) -> str:
    """open_clip's ``clean='lower'``, with no shortcut."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=string.printable))
def test_ascii_text_is_cleaned_as_ftfy_cleans_it(text: str) -> None:
    assert clean_lower(text) == full_cleaning(text)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_text_is_cleaned_as_ftfy_cleans_it(text: str) -> None:
    assert clean_lower(text) == full_cleaning(text)


def test_text_that_needs_ftfy_still_gets_it() -> None:
    # Entities (three levels: ftfy's unescape, then two), mojibake, a control character.
    assert clean_lower("Fish &amp;amp;amp; Chips") == "fish & chips"
    assert clean_lower("caf\u00c3\u00a9 au lait") == "café au lait"
    assert clean_lower("a\x00b  C") == "ab c"
    assert clean_lower("  A Red\tCircle\n") == "a red circle"
