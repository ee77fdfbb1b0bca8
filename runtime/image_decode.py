"""Image decoding and mode handling shared by training and serving: one definition of both.

Torch-free: the training transform (``model.preprocess``), the corpus readers and the indexer's
NumPy preprocessing all call these, so an image means the same pixels everywhere.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from runtime.errors import ImageDecodeError

# Greyscale modes whose samples are wider than 8 bits: Pillow's own convert("RGB") clips them
# at 255, which turns most of a 16-bit image white.
_WIDE_INTEGER_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_WHITE = (255, 255, 255, 255)
# The largest header decode_image_bounded accepts: a gigapixel is past any camera's photo (a
# 200 MP phone sensor, a stitched panorama); beyond it a header is a mistake or an attack.
MAX_HEADER_PIXELS: Final = 1_000_000_000


def decode_image(
    data: bytes, *, max_pixels: int | None, formats: Sequence[str] | None = None
) -> Image.Image:
    """Open and fully decode ``data`` in its stored mode; raise :class:`ImageDecodeError`.

    ``formats`` limits the Pillow decoders tried (None: all of them). Untrusted input should
    pass a short list: some decoders run external programs (EPS runs Ghostscript).

    ``max_pixels`` (None: ``Image.MAX_IMAGE_PIXELS``) is checked on the header, before any
    pixel is decoded. Pillow's own decompression-bomb check still runs when the image is
    opened, so a ``max_pixels`` above Pillow's limit does not lift it.
    """
    if not data:
        raise ImageDecodeError("corrupt image", "no data (0 bytes)")
    with _decode_errors(formats):
        image = Image.open(io.BytesIO(data), formats=None if formats is None else tuple(formats))
        _check_pixels(image.size, Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
        # Image.open only parses the header; load() decodes, so truncation fails here.
        image.load()
    return image


@dataclass(frozen=True, slots=True)
class BoundedImage:
    """An image decoded for indexing: ``image`` in its stored mode (EXIF kept), possibly
    reduced; ``full_size`` its (width, height) unreduced, turned as ``image`` is (a TIFF
    decoder applies the EXIF orientation itself and drops the tag; a JPEG's is left to
    :func:`to_rgb`)."""

    image: Image.Image
    full_size: tuple[int, int]


def decode_image_bounded(
    data: bytes,
    *,
    min_side: int,
    max_pixels: int = MAX_HEADER_PIXELS,
    formats: Sequence[str] | None = None,
) -> BoundedImage:
    """Decode ``data`` with its memory bounded, for indexing a user's photos of any size.

    A JPEG is decoded reduced by its DCT scaling (``Image.draft``: 1/2, 1/4 or 1/8, costing a
    fraction of a full decode) and any other format reduced after decoding (``Image.reduce``),
    by the largest integer factor that keeps the shorter side at least ``min_side``: a model
    resizes the shorter side to its input size, so ``min_side`` well above it changes nothing
    a model sees, while a 100-megapixel photo takes about 1.5 MP of memory. An image whose
    shorter side is under ``2 * min_side`` is decoded exactly as :func:`decode_image` decodes
    it. Only a header declaring more than ``max_pixels`` (default one gigapixel) is refused
    ("image too large"); Pillow's process-wide decompression-bomb limit (89 MP) is not
    applied, as it is meant for images from anyone, not a user's own files. Errors as
    :func:`decode_image`'s.
    """
    if not data:
        raise ImageDecodeError("corrupt image", "no data (0 bytes)")
    with _decode_errors(formats):
        image: Image.Image = _open_without_bomb_check(data, formats)
        full_size = image.size
        _check_pixels(full_size, max_pixels)
        # Both no-ops but for JPEG (and MPO), whose decoder then scales while decoding.
        image.draft(None, (min_side, min_side))
        image.load()
        full_size = _turned_as(full_size, image.size)
        factor = min(image.size) // min_side
        if factor >= 2:
            exif = image.getexif()
            image = _reduce(image, factor)
            if exif and "exif" not in image.info:
                # A TIFF keeps its EXIF in its own tags, which the reduced copy lacks; without
                # it the orientation would be lost.
                image.info["exif"] = exif.tobytes()
    return BoundedImage(image, full_size)


def _turned_as(full_size: tuple[int, int], loaded: tuple[int, int]) -> tuple[int, int]:
    """``full_size`` swapped when the decoder turned the image (Pillow's TIFF decoder applies
    the EXIF orientation and drops the tag): whichever way has the loaded image's shape."""
    (width, height), (loaded_width, loaded_height) = full_size, loaded
    as_is = abs(loaded_width * height - loaded_height * width)
    swapped = abs(loaded_width * width - loaded_height * height)
    return (height, width) if swapped < as_is else full_size


def _reduce(image: Image.Image, factor: int) -> Image.Image:
    try:
        return image.reduce(factor)
    except ValueError:
        # Palette and bilevel images cannot be averaged as they are; to_rgb would make them
        # RGB (over white where transparent) anyway.
        return image.convert("RGBA" if image.has_transparency_data else "RGB").reduce(factor)


def _open_without_bomb_check(data: bytes, formats: Sequence[str] | None) -> ImageFile.ImageFile:
    """``Image.open`` (header only) without Pillow's decompression-bomb check, which reads the
    process-wide ``Image.MAX_IMAGE_PIXELS``: raising that global for one call would lift the
    limit for every thread decoding an upload at the same time. The caller checks its own."""
    Image.preinit()
    prefix = data[:16]
    for name in [format.upper() for format in formats] if formats else list(Image.ID):
        if name not in Image.OPEN:
            Image.init()  # the rarer plugins register on first need, as in Image.open
        if name not in Image.OPEN:
            continue
        factory, accept = Image.OPEN[name]
        accepted = accept(prefix) if accept is not None else True
        if not accepted or isinstance(accepted, str):
            continue  # a string is Pillow's "looks like this format, but unsupported"
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # not this format after all: Image.open tries the next one too
    raise UnidentifiedImageError("cannot identify image file")


@contextmanager
def _decode_errors(formats: Sequence[str] | None) -> Iterator[None]:
    """Pillow's many ways of saying "this image is unusable" as one :class:`ImageDecodeError`."""
    try:
        yield
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as error:
        # Pillow's message names only the in-memory buffer; say what it means instead.
        known = f" (accepted: {', '.join(formats)})" if formats else ""
        raise ImageDecodeError("corrupt image", f"not a recognised image format{known}") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # The warning arrives as an exception when warnings are errors (python -W error).
        raise ImageDecodeError("image too large", str(error)) from error
    except Exception as error:
        # Pillow signals bad data with many types (OSError, SyntaxError, ValueError,
        # struct.error, ...); any of them means this one image is unusable.
        reason = "truncated image" if "truncated" in str(error).lower() else "corrupt image"
        raise ImageDecodeError(reason, f"{type(error).__name__}: {error}") from error


def _check_pixels(size: tuple[int, int], limit: int | None) -> None:
    # Pillow only warns between MAX_IMAGE_PIXELS and twice that; this refuses both, without
    # touching the process-wide warning filters (not thread-safe).
    pixels = size[0] * size[1]
    if limit is not None and pixels > limit:
        raise ImageDecodeError(
            "image too large", f"{size[0]}x{size[1]} = {pixels:,} pixels, limit {limit:,}"
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright (EXIF orientation applied) 8-bit RGB of ``image``, whatever its mode.

    Transparency is composited over white; 16- and 32-bit integer greyscale is scaled by
    1/257 (so 65535 is 255), float greyscale clipped to 0..255. An upright RGB image is
    returned as is, not copied.
    """
    # exif_transpose copies even an upright image, and most images are upright.
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    # Wide greyscale first: a transparency key on it is rare, and Pillow would clip it too.
    if image.mode in _WIDE_INTEGER_MODES:
        return _grey_to_rgb(np.asarray(image, dtype=np.float64) / 257.0)
    if image.mode == "F":
        return _grey_to_rgb(np.asarray(image, dtype=np.float64))
    if image.has_transparency_data:
        return _over_white(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _over_white(image: Image.Image) -> Image.Image:
    # The colour under a fully transparent pixel is arbitrary (often black), so dropping alpha
    # would show it; over white, transparency looks as a viewer shows it on a page.
    if image.mode == "La":
        image = image.convert("LA")  # Pillow has no direct La -> RGBA conversion
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_to_rgb(values: np.ndarray) -> Image.Image:
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")
