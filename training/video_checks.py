"""Does a video model know which way time runs? Two checks on a video split's test clips.

- **time order**: each caption scores its clip above the same frames played backwards (every
  synthetic event is asymmetric in time: a move, a growth, a colour change), in %.
- **direction**: for clips whose caption names a motion ("moves from left to right"), the
  clip scores its caption above the same caption with the opposite motion ("moves from right
  to left"), in %: the text side of the same question, on the same object.

Mean pooling of frames cannot pass the first (a clip and its reverse have the same mean); a
temporal model trained with the time-order loss should pass both near 100 %.
"""

from __future__ import annotations

import torch

from model.config import PreprocessConfig
from model.data.synth.videos import MOVE_PHRASES
from model.preprocess import normalise_pixels
from model.tokenizer import tokenize
from training.video_data import CaptionedVideos, VideoTextEncoder, sample_frame_indices

_OPPOSITE = {"moves right": "moves left", "moves left": "moves right"}
_OPPOSITE |= {"moves up": "moves down", "moves down": "moves up"}


def opposite_motion(caption: str) -> str | None:
    """The caption with its motion phrase turned around, or None when it names no motion."""
    for event, phrases in MOVE_PHRASES.items():
        for i, phrase in enumerate(phrases):
            if phrase in caption:
                return caption.replace(phrase, MOVE_PHRASES[_OPPOSITE[event]][i])
    return None


@torch.no_grad()
def time_checks(
    towers: VideoTextEncoder,
    split: CaptionedVideos,
    preprocess: PreprocessConfig,
    device: torch.device,
    num_frames: int,
    context_length: int,
) -> dict[str, float]:
    """``time_order_acc`` and ``direction_acc`` in % (see the module docstring)."""
    indices = sample_frame_indices(split.frames.shape[1], num_frames, None)
    was_training = towers.training
    towers.train(False)
    try:
        clips = normalise_pixels(split.frames[:, indices].to(device), preprocess)
        forward = towers.encode_image(clips).float().cpu()
        backward = towers.encode_image(clips.flip(1)).float().cpu()
        first = [captions[0] for captions in split.captions]
        texts = towers.encode_text(tokenize(first, context_length).to(device)).float().cpu()
        moving = [(i, opposite_motion(c)) for i, c in enumerate(first)]
        moving = [(i, c) for i, c in moving if c is not None]
        turned = [c for _, c in moving if c is not None]
        rows = torch.tensor([i for i, _ in moving], dtype=torch.long)
        opposite = (
            towers.encode_text(tokenize(turned, context_length).to(device)).float().cpu()
            if turned
            else torch.empty(0, texts.shape[1])
        )
    finally:
        towers.train(was_training)
    in_order = ((texts * forward).sum(1) > (texts * backward).sum(1)).float().mean()
    metrics = {"time_order_acc": float(in_order) * 100}
    if len(rows):
        right = (forward[rows] * texts[rows]).sum(1) > (forward[rows] * opposite).sum(1)
        metrics["direction_acc"] = float(right.float().mean()) * 100
    return metrics
