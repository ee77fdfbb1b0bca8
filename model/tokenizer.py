"""The text tokenizer: open_clip's BPE (the vocabulary ships inside open_clip, no download)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import open_clip
import torch


@cache
def get_tokenizer(context_length: int) -> open_clip.SimpleTokenizer:
    return open_clip.SimpleTokenizer(context_length=context_length)


def tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """Token ids [N, context_length] (start token, BPE ids, end token, zero padding)."""
    return get_tokenizer(context_length)(list(texts))
