"""Rendering of backgrounds and shapes.

Scenes are drawn at ``SUPERSAMPLE`` times the output size and reduced with a box filter, which
anti-aliases edges far more cheaply than drawing with sub-pixel precision.
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from PIL import Image, ImageDraw

from model.data.synth.scenes import Scene
from model.data.synth.vocabulary import COLOURS

SUPERSAMPLE: Final = 4
NOISE_STD: Final = 3.0
COLOUR_JITTER: Final = 10


def render_background(rng: np.random.Generator, kind: str, tone: tuple[int, int, int], side: int):
    """A (side, side, 3) uint8 background of the given kind around a base tone."""
    base = np.array(tone, dtype=np.float32)
    delta = float(rng.uniform(14, 28))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if kind == "plain":
        field = np.zeros((side, side), np.float32)
    elif kind == "striped":
        period = rng.uniform(0.08, 0.18)
        angle = rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4])
        coord = xx * math.cos(angle) + yy * math.sin(angle)
        field = np.where((coord / period) % 1.0 < 0.5, delta, -delta)
    elif kind == "checkered":
        period = rng.uniform(0.1, 0.22)
        field = np.where(((xx // period) + (yy // period)) % 2 == 0, delta, -delta)
    elif kind == "dotted":
        period = rng.uniform(0.1, 0.18)
        fx, fy = (xx / period) % 1.0 - 0.5, (yy / period) % 1.0 - 0.5
        field = np.where(fx**2 + fy**2 < 0.06, 1.6 * delta, 0.0)
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        coord = (xx - 0.5) * math.cos(angle) + (yy - 0.5) * math.sin(angle)
        field = coord * 2.5 * delta
    else:
        raise ValueError(f"unknown background {kind!r}")
    return np.clip(base + field[..., None], 0, 255).astype(np.uint8)


def jittered_colour(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))  # type: ignore[return-value]


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    centre: tuple[float, float],
    radius: float,
    fill: tuple[int, int, int],
) -> None:
    """Draw ``shape`` centred at ``centre`` (pixels) spanning about 2 * ``radius`` pixels."""
    cx, cy = centre
    r = radius
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = r * 0.85
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(cx, cy - r), (cx + r * 0.97, cy + r * 0.8), (cx - r * 0.97, cy + r * 0.8)], fill=fill
        )
    elif shape == "diamond":
        draw.polygon(
            [(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill
        )
    elif shape == "star":
        points = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            theta = -math.pi / 2 + k * math.pi / 5
            points.append((cx + rad * math.cos(theta), cy + rad * math.sin(theta)))
        draw.polygon(points, fill=fill)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, round(r * 0.42)))
    elif shape == "heart":
        lobe = r * 0.52
        for sx in (-1, 1):
            lx, ly = cx + sx * r * 0.46, cy - r * 0.32
            draw.ellipse((lx - lobe, ly - lobe, lx + lobe, ly + lobe), fill=fill)
        draw.polygon(
            [(cx - r * 0.95, cy - r * 0.12), (cx + r * 0.95, cy - r * 0.12), (cx, cy + r)],
            fill=fill,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}")


def finish(rng: np.random.Generator, canvas: Image.Image, side: int) -> np.ndarray:
    """Reduce a supersampled canvas to ``side`` pixels and add light sensor noise."""
    small = np.asarray(canvas.resize((side, side), Image.Resampling.BOX), dtype=np.float32)
    noisy = small + rng.normal(0.0, NOISE_STD, size=small.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render_scene(rng: np.random.Generator, scene: Scene, side: int) -> np.ndarray:
    """The scene as a (side, side, 3) uint8 RGB array."""
    big = side * SUPERSAMPLE
    canvas = Image.fromarray(render_background(rng, scene.background, scene.tone, big))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        centre = (obj.centre[0] * big, obj.centre[1] * big)
        draw_shape(
            draw, obj.shape, centre, obj.diameter * big / 2, jittered_colour(rng, obj.colour)
        )
    return finish(rng, canvas, side)
