"""The training image transform, built from the PreprocessConfig that bundles also carry."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from model.config import PreprocessConfig
from model.data.images import to_rgb
from model.errors import ModelError

_INTERPOLATION = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


def image_transform(config: PreprocessConfig) -> transforms.Compose:
    """PIL image (any mode) -> normalised float tensor [3, S, S]: shorter side to S, centre crop.

    No augmentation: captions name positions (left, top, ...), so flips and crops would make
    them false.
    """
    size = config.image_size
    if size is None:
        raise ModelError("preprocess.image_size is unset; resolve it from the model first")
    return transforms.Compose(
        [
            # Shared with the serving side (indexer.images): one definition of the modes.
            transforms.Lambda(to_rgb),
            transforms.Resize(size, interpolation=_INTERPOLATION[config.interpolation]),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(config.mean, config.std),
        ]
    )


def to_tensor_batch(images: list[Image.Image], config: PreprocessConfig) -> torch.Tensor:
    transform = image_transform(config)
    return torch.stack([transform(image) for image in images])
