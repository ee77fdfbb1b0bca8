"""The training image transform, built from the PreprocessConfig that bundles also carry.

It has two halves so that training can decode a corpus once: :func:`image_pixels` (PIL image ->
uint8 [3, S, S]: mode, resize, crop) is what a decode cache stores, and :func:`normalise_pixels`
(uint8 -> normalised float) runs per batch. :func:`image_transform` is the two in one.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from model.config import PreprocessConfig
from model.errors import ModelError
from runtime.image_decode import to_rgb

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def image_transform(config: PreprocessConfig) -> transforms.Compose:
    """PIL image (any mode) -> normalised float tensor [3, S, S]: shorter side to S, centre crop.

    No augmentation: captions name positions (left, top, ...), so flips and crops would make
    them false.
    """
    return transforms.Compose(
        [
            image_pixels(config),
            transforms.Lambda(lambda pixels: normalise_pixels(pixels, config)),
        ]
    )


def image_pixels(config: PreprocessConfig) -> transforms.Compose:
    """PIL image (any mode) -> uint8 tensor [3, S, S]: shorter side to S, centre crop."""
    size = config.image_size
    if size is None:
        raise ModelError("preprocess.image_size is unset; resolve it from the model first")
    return transforms.Compose(
        [
            # Shared with the serving side (runtime.images): one definition of the modes.
            transforms.Lambda(to_rgb),
            transforms.Resize(size, interpolation=_INTERPOLATION[config.interpolation]),
            transforms.CenterCrop(size),
            transforms.PILToTensor(),
        ]
    )


def normalise_pixels(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """uint8 [..., 3, S, S] -> float, scaled to [0, 1] then normalised by the config's mean/std
    (what torchvision's ToTensor + Normalize give, to the last bit)."""
    mean = torch.tensor(config.mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(config.std, device=pixels.device).view(3, 1, 1)
    return (pixels.float() / 255.0 - mean) / std


def to_tensor_batch(images: list[Image.Image], config: PreprocessConfig) -> torch.Tensor:
    transform = image_transform(config)
    return torch.stack([transform(image) for image in images])
