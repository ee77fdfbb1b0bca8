"""Text to token ids for the text model: open_clip's cleaning, then the bundle's ``tokenizer.json``.

Torch-free: ``tokenizers`` runs the BPE; the ids equal ``open_clip.SimpleTokenizer``'s
(``tests/test_tokenizer_parity.py``).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import numpy.typing as npt
from tokenizers import Tokenizer, normalizers
from tokenizers.normalizers import Normalizer

from runtime.errors import BundleError, InputError
from runtime.spec import TextSpec

# The shortest encoding is [sot, eot]: an empty batch has that width when padding is trimmed.
_MIN_LENGTH = 2


def clean_lower(text: str) -> str:
    """open_clip's ``clean='lower'``: ftfy, HTML-unescape twice, collapse whitespace, lower-case.

    ftfy and HTML unescaping have no ``tokenizers`` normalizer, and the whitespace and case steps
    must follow them (an entity can decode to a space or a capital) and use Python's Unicode
    tables as training did, so the whole cleaning runs here, in open_clip's order.
    """
    if not _ftfy_leaves_alone(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _ftfy_leaves_alone(text: str) -> bool:
    """Whether ftfy and both unescapes are sure no-ops: printable ASCII without ``&`` has no
    mojibake, no entity, no control character, curly quote or ligature to fix, and is its own
    NFC form. Most queries are such text, and ftfy costs more than hashing them (issue 18);
    ``tests/test_text_cleaning.py`` checks the shortcut against ftfy."""
    return text.isascii() and text.isprintable() and "&" not in text


def check_texts(texts: Sequence[str]) -> None:
    """Raise :class:`InputError` unless ``texts`` is a sequence of strings."""
    if isinstance(texts, str):
        raise InputError("texts must be a sequence of strings, not a single str")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"text {i} is a {type(text).__name__}, not a str")


class TextTokenizer:
    """Token ids ``[B, L]`` int64 for a batch of texts, as the text model takes them."""

    def __init__(self, tokenizer: Tokenizer, spec: TextSpec) -> None:
        self._tokenizer = tokenizer
        self.spec = spec

    @classmethod
    def from_file(cls, path: Path, spec: TextSpec) -> TextTokenizer:
        """Load a bundle's ``tokenizer.json``; ``BundleError`` if it is missing or unusable."""
        if not path.is_file():
            raise BundleError(f"{path}: tokenizer file is missing")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable files
            raise BundleError(f"{path}: not a valid tokenizer.json: {e}") from e
        truncation = tokenizer.truncation
        max_length = truncation["max_length"] if truncation else None
        if max_length != spec.context_length:
            raise BundleError(
                f"{path}: truncates to {max_length} tokens, but the bundle's context length is "
                f"{spec.context_length}"
            )
        # clean_lower() has lower-cased with Python's tables; the file's Lowercase would do it
        # again with the Unicode version of this ``tokenizers`` build, which gives lower-case
        # forms to some characters Python 3.11 leaves alone. The file's other normalizers are
        # kept: whitespace and final sigma are no-ops on cleaned text, the special-token fix is
        # needed.
        tokenizer.normalizer = _without_lowercase(tokenizer.normalizer)
        tokenizer.enable_padding(
            pad_id=spec.pad_id,
            pad_token=(tokenizer.padding or {}).get("pad_token", ""),
            length=None if spec.trim_padding else spec.context_length,
        )
        return cls(tokenizer, spec)

    def __call__(self, texts: Sequence[str]) -> npt.NDArray[np.int64]:
        """Ids ``[len(texts), L]``: L is the longest encoding when ``spec.trim_padding``, else
        ``spec.context_length``; an empty batch is ``[0, 2]`` or ``[0, context_length]``."""
        check_texts(texts)
        cleaned = [clean_lower(text) for text in texts]
        if not cleaned:
            width = _MIN_LENGTH if self.spec.trim_padding else self.spec.context_length
            return np.zeros((0, width), dtype=np.int64)
        # ftfy has replaced lone surrogates (no UTF-8 form) with U+FFFD, as in training.
        encodings = self._tokenizer.encode_batch(cleaned)
        return np.array([e.ids for e in encodings], dtype=np.int64)


def _without_lowercase(normalizer: Normalizer | None) -> Normalizer | None:
    """``normalizer`` without its Lowercase steps."""
    if isinstance(normalizer, normalizers.Lowercase):
        return None
    if isinstance(normalizer, normalizers.Sequence):
        steps = [normalizer[i] for i in range(len(normalizer))]
        return normalizers.Sequence([n for n in steps if not isinstance(n, normalizers.Lowercase)])
    return normalizer
