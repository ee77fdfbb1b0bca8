"""open_clip's text tokenizer as a Hugging Face ``tokenizers`` ``tokenizer.json`` (export time).

The file reproduces ``open_clip.SimpleTokenizer`` token for token on text that has been through
open_clip's ftfy + HTML cleaning (``runtime.text`` does that cleaning in Python first); on text
that cleaning leaves alone, the file alone is enough (see ``tests/test_tokenizer_parity.py`` for
the few documented exceptions).

Every character class is computed here from the libraries open_clip itself uses (the ``regex``
module for its pattern, Python's ``str`` for whitespace and lower-casing), so the file does not
depend on which Unicode version the consumer's regex engine or ``tokenizers`` build knows.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import regex
from open_clip.tokenizer import bytes_to_unicode, default_bpe
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from model.clip_tokens import EOT_ID, PAD_ID, SOT_ID, VOCAB_SIZE

SOT: Final = "<start_of_text>"
EOT: Final = "<end_of_text>"
END_OF_WORD: Final = "</w>"
# SimpleTokenizer.pat, which it compiles with re.IGNORECASE.
_CONTRACTIONS: Final = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_LETTERS: Final = r"[\p{L}]"
_NUMBER: Final = r"[\p{N}]"
_OTHER: Final = r"[^\s\p{L}\p{N}]"

_CAPITAL_SIGMA: Final = "\N{GREEK CAPITAL LETTER SIGMA}"
_SMALL_SIGMA: Final = "\N{GREEK SMALL LETTER SIGMA}"
_FINAL_SIGMA: Final = "\N{GREEK SMALL LETTER FINAL SIGMA}"

_Ranges = list[tuple[int, int]]


def vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges exactly as ``SimpleTokenizer.__init__`` builds them."""
    with gzip.open(bpe_path or default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [(a, b) for a, b in (line.split() for line in lines[1 : 49152 - 256 - 2 + 1])]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + END_OF_WORD for c in byte_chars] + ["".join(m) for m in merges]
    tokens += [SOT, EOT]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or vocab[SOT] != SOT_ID or vocab[EOT] != EOT_ID:
        raise ValueError(f"{bpe_path or default_bpe()}: not open_clip's 49408-token vocabulary")
    return vocab, merges


@cache
def _code_points() -> npt.NDArray[np.uint32]:
    """Every Unicode scalar value (no surrogates), in order."""
    cps = np.arange(0x110000, dtype=np.uint32)
    return cps[(cps < 0xD800) | (cps > 0xDFFF)]


def _text(cps: npt.NDArray[np.uint32]) -> str:
    return cps.astype("<u4").tobytes().decode("utf-32-le")


@cache
def _universe() -> tuple[str, str]:
    """Every Unicode scalar value, in order, in two runs around the surrogates."""
    cps = _code_points()
    return _text(cps[cps < 0xD800]), _text(cps[cps > 0xDFFF])


@cache
def _ranges(pattern: str, flags: int = 0) -> _Ranges:
    """Code point ranges of the characters that the one-character ``pattern`` matches."""
    out: _Ranges = []
    for part in _universe():
        for m in regex.finditer(f"(?:{pattern})+", part, flags):
            out.append((ord(m.group()[0]), ord(m.group()[-1])))
    return out


def _chars_ranges(chars: Iterable[str]) -> _Ranges:
    return _cps_ranges(np.array(sorted(set(map(ord, chars))), dtype=np.uint32))


def _cps_ranges(cps: npt.NDArray[np.uint32]) -> _Ranges:
    """Runs of consecutive code points in the sorted ``cps``."""
    if not len(cps):
        return []
    breaks = np.flatnonzero(np.diff(cps.astype(np.int64)) != 1)
    starts = cps[np.r_[0, breaks + 1]]
    ends = cps[np.r_[breaks, len(cps) - 1]]
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def _complement(ranges: _Ranges) -> _Ranges:
    out: _Ranges = []
    start = 0
    for a, b in sorted(ranges):
        if a > start:
            out.append((start, a - 1))
        start = b + 1
    if start <= 0x10FFFF:
        out.append((start, 0x10FFFF))
    return out


def _char_class(ranges: _Ranges) -> str:
    """An Oniguruma character class listing ``ranges`` explicitly."""
    parts = (f"\\x{{{a:X}}}" + (f"-\\x{{{b:X}}}" if b > a else "") for a, b in ranges)
    return "[" + "".join(parts) + "]"


def _literal(text: str) -> str:
    """``text`` as open_clip's case-insensitive pattern matches it ('s also matches 's with a
    long s, U+017F)."""
    return "".join(_char_class(_ranges(regex.escape(c), regex.IGNORECASE)) for c in text)


@cache
def split_pattern() -> str:
    """``SimpleTokenizer.pat`` with each class spelled out as the ``regex`` module matches it.

    Under IGNORECASE that differs from the Unicode categories (U+0345 is in none of the classes,
    so open_clip drops it), and the consumer's regex engine may know another Unicode version.
    """
    specials = [_literal(SOT), _literal(EOT)]
    contractions = [_literal(c) for c in _CONTRACTIONS]
    classes = [_char_class(_ranges(c, regex.IGNORECASE)) for c in (_LETTERS, _NUMBER, _OTHER)]
    letters, number, other = classes
    return "|".join([*specials, *contractions, f"{letters}+", number, f"{other}+"])


@cache
def _unbroken_special_pattern(context_length: int) -> str:
    """A ``<`` that starts a literal special token which open_clip does *not* read as one.

    open_clip only matches a special token where its scan stands at a token boundary: after a
    punctuation character, the greedy punctuation run swallows the ``<`` ("!<end_of_text>" is
    "!<", "end", "_", ...). ``tokenizers`` matches added tokens anywhere, so the normalizer
    puts a space after such a ``<``: the pre-tokenizer drops it, and '<' next to a letter is a
    token boundary anyway, so the tokens do not change. The boundary test looks back past a run
    of special tokens (each starts a new scan) to the character before them: open_clip is at a
    boundary there unless that character belongs to the punctuation class.

    The look-behind skips at most ``context_length`` special tokens: unbounded, it is quadratic
    in the length of a run of them; a special token that far into a run is cut off anyway.
    """
    specials = f"(?:{_literal(SOT)}|{_literal(EOT)})"
    boundary = _char_class(_complement(_ranges(_OTHER, regex.IGNORECASE)))
    tails = "|".join(regex.escape(s[1:]) for s in (SOT, EOT))
    return f"(?<!(?:^|{boundary}){specials}{{0,{context_length}}})<(?={tails})"


def _final_sigma(prefix: str, cps: npt.NDArray[np.uint32]) -> npt.NDArray[np.bool_]:
    """Whether ``(prefix + c + "Σ").lower()`` ends in 'ς', for each ``c`` (one ``lower`` call).

    The segments do not interact: '!' is neither cased nor case-ignorable, so the rule stops there
    in both directions; no ``c`` here lower-cases to a sigma, so there is one sigma per segment.
    """
    columns = [np.full_like(cps, ord(ch)) for ch in prefix]
    columns += [cps, np.full_like(cps, ord(_CAPITAL_SIGMA))]
    lowered = _text(np.stack(columns, axis=1).ravel()).lower()
    out = np.frombuffer(lowered.encode("utf-32-le"), dtype="<u4")
    sigmas = out[(out == ord(_SMALL_SIGMA)) | (out == ord(_FINAL_SIGMA))]
    if len(sigmas) != len(cps):
        raise AssertionError("a character lower-cased to a sigma")
    return sigmas == ord(_FINAL_SIGMA)


@cache
def _final_sigma_pattern() -> str:
    """A capital sigma that Python's ``str.lower`` turns into final sigma 'ς'.

    Python applies Unicode's Final_Sigma rule (a cased letter, case-ignorables, Σ, and no cased
    letter after more case-ignorables); ``tokenizers``' Lowercase always gives the non-final
    form. The two properties are read off ``str.lower`` itself.
    """
    cps = _code_points()
    sigmas = [ord(c) for c in (_CAPITAL_SIGMA, _SMALL_SIGMA, _FINAL_SIGMA)]
    cps = cps[~np.isin(cps, sigmas)]
    cased_or_ignorable = _final_sigma("!A", cps)
    cased_only = _final_sigma("!", cps)  # cased and not case-ignorable
    cased = np.union1d(cps[cased_only], sigmas).astype(np.uint32)
    ignorable = cps[cased_or_ignorable & ~cased_only]
    cased_cls = _char_class(_cps_ranges(cased))
    ignorable_cls = _char_class(_cps_ranges(ignorable))
    return f"(?<={cased_cls}{ignorable_cls}*)\\x{{3A3}}(?!{ignorable_cls}*{cased_cls})"


@cache
def _whitespace_class() -> str:
    """Python's ``str.isspace`` set, which ``str.split()`` (open_clip's collapse) uses."""
    return _char_class(_chars_ranges(c for part in _universe() for c in part if c.isspace()))


def build_tokenizer(context_length: int) -> Tokenizer:
    """open_clip's ``SimpleTokenizer(context_length)`` with ``clean='lower'``, minus ftfy/HTML."""
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    vocab, merges = vocab_and_merges()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=END_OF_WORD))
    # open_clip: strip, " ".join(text.split()), .lower(); then the special-token fix above.
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(f"{_whitespace_class()}+"), " "),
            normalizers.Strip(),
            normalizers.Replace(Regex(_final_sigma_pattern()), _FINAL_SIGMA),
            normalizers.Lowercase(),
            normalizers.Replace(Regex(_unbroken_special_pattern(context_length)), "< "),
        ]
    )
    # re.findall(pat, text): keep the matches, drop what lies between them (whitespace).
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern()), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.Sequence(
        [decoders.ByteLevel(), decoders.Replace(END_OF_WORD, " ")]
    )
    # Special tokens in the text are found on the normalized (lower-cased) text, as open_clip's
    # case-insensitive pattern finds them; they keep their vocabulary ids.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=True) for t in (SOT, EOT)])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, SOT_ID), (EOT, EOT_ID)]
    )
    # Truncation keeps room for the two special tokens: [sot] + ids[: n - 2] + [eot].
    tokenizer.enable_truncation(max_length=context_length)
    pad_token = next(t for t, i in vocab.items() if i == PAD_ID)
    tokenizer.enable_padding(pad_id=PAD_ID, pad_token=pad_token)
    return tokenizer


def tokenizer_json(context_length: int) -> str:
    """The content of ``tokenizer.json`` for ``context_length``."""
    return build_tokenizer(context_length).to_str()


def write_tokenizer_json(path: Path, context_length: int) -> None:
    """Write ``tokenizer_json(context_length)`` to ``path``."""
    path.write_text(tokenizer_json(context_length), encoding="utf-8")
