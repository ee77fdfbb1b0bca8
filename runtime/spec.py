"""How inputs become model inputs: the parts of ``bundle.json`` that preprocessing reads.

The export writes these from the training config, and the runtime follows them; nothing a
consumer needs is left to guess.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImageSpec(_Spec):
    """Shorter side resized to ``size`` with ``interpolation``, centre crop to ``size``²,
    scaled to [0, 1], then ``(x - mean) / std`` per RGB channel."""

    size: int = Field(ge=8)
    resize_mode: Literal["shortest"] = "shortest"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class TextSpec(_Spec):
    """open_clip's BPE: ``tokenizer.json`` after open_clip's text cleaning (``clean``).

    ``trim_padding``: the text model accepts any length up to ``context_length``, so a batch
    is padded only to its longest text (a causal tower reads the end-of-text token, which
    never sees the padding after it).
    """

    context_length: int = Field(ge=2)
    clean: Literal["lower"] = "lower"
    pad_id: int = 0
    trim_padding: bool = True


class VideoSpec(_Spec):
    """``decode_frames`` frames decoded evenly over the video (first and last included), then
    the centre frame of each of ``frames`` equal segments of those; ``pooling`` says how the
    video model combines them (``mean`` for a model trained on images only)."""

    frames: int = Field(ge=1)
    decode_frames: int = Field(ge=1)
    pooling: Literal["temporal", "mean"]
