"""Images (and decoded video frames) to model inputs with NumPy + Pillow, as training does.

The pixels match ``model.preprocess.image_transform`` (torchvision on PIL images) to float
rounding: the same decoding and mode handling (``runtime.image_decode``), the same resize size
and filter, the same crop offsets, the same float32 arithmetic. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.errors import ImageDecodeError, InputError
from runtime.image_decode import decode_image, to_rgb
from runtime.spec import ImageSpec

_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# What the runtime decodes: common web and camera formats, and none of Pillow's decoders that
# call out to other programs (EPS runs Ghostscript) on bytes that may come from anyone.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def load_image(source: bytes | Path, *, max_pixels: int | None = None) -> Image.Image:
    """Decode an image from bytes or a file, fully; raise :class:`InputError` if unusable.

    ``max_pixels`` (None: Pillow's ``Image.MAX_IMAGE_PIXELS``) is checked before decoding.
    """
    if isinstance(source, bytes):
        name, data = f"image data ({len(source):,} bytes)", source
    else:
        name, data = str(source), _read(source)
    try:
        return decode_image(data, max_pixels=max_pixels, formats=ACCEPTED_FORMATS)
    except ImageDecodeError as error:
        raise InputError(f"{name}: {error}") from error


def _read(path: Path) -> bytes:
    try:
        # All bytes up front, so no file handle outlives a failed decode.
        return path.read_bytes()
    except FileNotFoundError as error:
        raise InputError(f"{path}: missing file") from error
    except OSError as error:
        raise InputError(f"{path}: unreadable file: {error}") from error


def preprocess_images(images: Sequence[Image.Image], spec: ImageSpec) -> np.ndarray:
    """PIL images (any mode) -> float32 [B, 3, S, S]: upright RGB, shorter side to S, centre
    crop, scaled to [0, 1], normalised."""
    return _normalise([_fit(to_rgb(image), spec) for image in images], spec)


def preprocess_frames(frames: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3] -> float32 [T, 3, S, S], exactly as images are."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    return _normalise([_fit(Image.fromarray(frame), spec) for frame in frames], spec)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``size``: torchvision's ``Resize(size)`` for PIL.

    The longer side is truncated, not rounded, as ``_compute_resized_output_size`` does.
    """
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _fit(image: Image.Image, spec: ImageSpec) -> np.ndarray:
    """RGB image -> uint8 [S, S, 3]: torchvision's Resize(S) then CenterCrop(S) on PIL."""
    size = spec.size
    target = resized_size(image.width, image.height, size)
    if target != image.size:
        image = image.resize(target, _FILTERS[spec.interpolation])
    # Python's round (half to even) on purpose: torchvision's centre crop offsets use it.
    top = round((image.height - size) / 2.0)
    left = round((image.width - size) / 2.0)
    return np.asarray(image.crop((left, top, left + size, top + size)))


def _normalise(pixels: list[np.ndarray], spec: ImageSpec) -> np.ndarray:
    """uint8 [S, S, 3] each -> float32 [B, 3, S, S]; float32 steps in ToTensor/Normalize order."""
    if not pixels:
        return np.empty((0, 3, spec.size, spec.size), dtype=np.float32)
    batch = np.stack(pixels).transpose(0, 3, 1, 2).astype(np.float32, order="C")
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, 3, 1, 1)
    batch /= np.float32(255.0)
    batch -= mean
    batch /= std
    return batch
