"""Short videos of one object moving, growing, shrinking or changing colour.

Every event has a time-reversed twin with the opposite caption (left to right / right to
left, grows / shrinks, red to blue / blue to red), so a model that ignores frame order cannot
tell a video from its reverse: the captions depend on time order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

import av
import numpy as np
from PIL import Image, ImageDraw

from model.data.synth.drawing import (
    SUPERSAMPLE,
    draw_shape,
    finish,
    jittered_colour,
    render_background,
)
from model.data.synth.scenes import article, background_tone
from model.data.synth.vocabulary import BACKGROUNDS, COLOURS, SHAPES, SIZE_WORDS, SIZES

EVENTS: Final = (
    "moves right",
    "moves left",
    "moves up",
    "moves down",
    "grows",
    "shrinks",
    "changes colour",
)

MOVE_PHRASES: Final[dict[str, tuple[str, ...]]] = {
    "moves right": ("moves from left to right", "slides to the right", "travels rightwards"),
    "moves left": ("moves from right to left", "slides to the left", "travels leftwards"),
    "moves up": ("moves from bottom to top", "rises upwards", "travels up the frame"),
    "moves down": ("moves from top to bottom", "falls downwards", "travels down the frame"),
}
_GROW_PHRASES: Final = ("grows", "gets bigger", "expands from small to large")
_SHRINK_PHRASES: Final = ("shrinks", "gets smaller", "contracts from large to small")
_STILL_PHRASES: Final = ("while {d} stays still", "next to {d} that does not move")


@dataclass(frozen=True, slots=True)
class StillObject:
    shape: str
    colour: str
    size: str
    centre: tuple[float, float]


@dataclass(frozen=True, slots=True)
class VideoEvent:
    event: str
    shape: str
    colour: str
    end_colour: str  # differs from ``colour`` only for "changes colour"
    size: str  # the size for moves and colour changes; grow/shrink span both sizes
    start: tuple[float, float]  # centre, fractions of the side
    end: tuple[float, float]
    switch_at: float  # fraction of the clip where a colour change happens
    still: StillObject | None
    background: str
    tone: tuple[int, int, int]


def _choose(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def sample_event(rng: np.random.Generator) -> VideoEvent:
    event = _choose(rng, EVENTS)
    shape, colour = _choose(rng, SHAPES), _choose(rng, list(COLOURS))
    end_colour = colour
    if event == "changes colour":
        end_colour = _choose(rng, [c for c in COLOURS if c != colour])
    size = _choose(rng, list(SIZES))
    # The moving object travels along one of the outer lanes; the still object sits in the
    # other outer lane, so their paths never cross.
    lane, other = (0.22, 0.78) if rng.random() < 0.5 else (0.78, 0.22)
    along = float(rng.uniform(0.42, 0.58))
    if event in ("moves right", "moves left"):
        start, end = (0.2, lane), (0.8, lane)
        still_centre = (along, other)
    elif event in ("moves up", "moves down"):
        start, end = (lane, 0.8), (lane, 0.2)
        still_centre = (other, along)
    else:
        start = end = (lane, along) if rng.random() < 0.5 else (along, lane)
        still_centre = (other, along) if start[0] == lane else (along, other)
    if event in ("moves left", "moves down"):
        start, end = end, start
    still = None
    if rng.random() < 0.4:
        still_colour = _choose(rng, list(COLOURS))
        still_shape = _choose(rng, [s for s in SHAPES if s != shape])
        still = StillObject(still_shape, still_colour, "small", still_centre)
    return VideoEvent(
        event=event,
        shape=shape,
        colour=colour,
        end_colour=end_colour,
        size=size,
        start=start,
        end=end,
        switch_at=float(rng.uniform(0.35, 0.65)),
        still=still,
        background=_choose(rng, BACKGROUNDS),
        tone=background_tone(rng),
    )


def caption_event(rng: np.random.Generator, ev: VideoEvent, n_captions: int) -> list[str]:
    captions: list[str] = []
    for _ in range(n_captions * 3):
        if len(captions) == n_captions:
            break
        size = _choose(rng, SIZE_WORDS[ev.size])
        if ev.event in MOVE_PHRASES:
            motion = _choose(rng, MOVE_PHRASES[ev.event])
            text = f"{article(size)} {size} {ev.colour} {ev.shape} {motion}"
        elif ev.event in ("grows", "shrinks"):
            phrases = _GROW_PHRASES if ev.event == "grows" else _SHRINK_PHRASES
            text = f"{article(ev.colour)} {ev.colour} {ev.shape} {_choose(rng, phrases)}"
        else:
            text = _choose(
                rng,
                (
                    f"a {size} {ev.shape} changes from {ev.colour} to {ev.end_colour}",
                    f"{article(size)} {size} {ev.colour} {ev.shape} turns {ev.end_colour}",
                    f"a {size} {ev.shape} that starts {ev.colour} and ends {ev.end_colour}",
                ),
            )
        if ev.still is not None:
            d = f"a {ev.still.size} {ev.still.colour} {ev.still.shape}"
            text += ", " + _choose(rng, _STILL_PHRASES).format(d=d)
        if text not in captions:
            captions.append(text)
    return captions


def render_event(rng: np.random.Generator, ev: VideoEvent, side: int, n_frames: int) -> np.ndarray:
    """The event as a (n_frames, side, side, 3) uint8 array."""
    big = side * SUPERSAMPLE
    background = Image.fromarray(render_background(rng, ev.background, ev.tone, big))
    fill_start, fill_end = jittered_colour(rng, ev.colour), jittered_colour(rng, ev.end_colour)
    still_fill = jittered_colour(rng, ev.still.colour) if ev.still else None
    frames = []
    for t in np.linspace(0.0, 1.0, n_frames):
        canvas = background.copy()
        draw = ImageDraw.Draw(canvas)
        if ev.still is not None and still_fill is not None:
            centre = (ev.still.centre[0] * big, ev.still.centre[1] * big)
            draw_shape(draw, ev.still.shape, centre, SIZES[ev.still.size] * big / 2, still_fill)
        x = ev.start[0] + (ev.end[0] - ev.start[0]) * t
        y = ev.start[1] + (ev.end[1] - ev.start[1]) * t
        diameter = SIZES[ev.size]
        if ev.event in ("grows", "shrinks"):
            small, large = SIZES["small"] * 0.8, SIZES["large"] * 1.1
            progress = t if ev.event == "grows" else 1.0 - t
            diameter = small + (large - small) * progress
        fill = fill_end if t >= ev.switch_at else fill_start
        draw_shape(draw, ev.shape, (x * big, y * big), diameter * big / 2, fill)
        frames.append(finish(rng, canvas, side))
    return np.stack(frames)


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """Encode RGB frames as H.264 (yuv420p) in an mp4 container; same frames, same bytes."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        # Constant QP, one thread: x264's adaptive modes (CRF with AQ and mb-tree) gave
        # different bytes for the same frames from one call to the next in the same process.
        # QP 12 is near-lossless, so colours survive the chroma subsampling.
        stream.options = {"qp": "12", "preset": "medium", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
