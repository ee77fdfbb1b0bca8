"""Image decoding and mode handling shared by training and serving: one definition of both.

Torch-free: the training transform (``model.preprocess``), the corpus readers and the indexer's
NumPy preprocessing all call these, so an image means the same pixels everywhere.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from runtime.errors import ImageDecodeError

# Greyscale modes whose samples are wider than 8 bits: Pillow's own convert("RGB") clips them
# at 255, which turns most of a 16-bit image white.
_WIDE_INTEGER_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
_WHITE = (255, 255, 255, 255)


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
    try:
        image = Image.open(io.BytesIO(data), formats=None if formats is None else tuple(formats))
        _check_pixels(image.size, Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels)
        # Image.open only parses the header; load() decodes, so truncation fails here.
        image.load()
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
    return image


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
