"""A convolutional stem for the ViT image tower: small 3x3 convolutions in place of the patch
embedding, ending in the same token grid.

A ViT cuts its image into patches and embeds each with one linear map (open_clip's ``conv1``, a
convolution whose kernel equals its stride). At 64 px with 16 px patches, a 10 px star lands at
any offset inside a patch, or across two, and one linear map must tell it from a diamond at
every offset. Xiao et al. ("Early convolutions help transformers see better", NeurIPS 2021)
replace that map with a few overlapping stride-2 convolutions; the tokens then carry local
shape, and training is steadier. Issue 40 measured that shape is where our model fails
(docs/results.md).

Data flow: images [B, 3, S, S] -> stride-2 3x3 convolutions, each followed by GroupNorm and
GELU, halving the side until one stride-``k`` convolution (kernel = stride) reaches the patch
grid -> [B, width, S/p, S/p], exactly what the linear patch embedding returned, so the
transformer, its positional embedding, masked vision modeling's hook on ``conv1`` and the ONNX
export are unchanged. No BatchNorm: a frozen tower (the video run freezes the image tower)
must not move, and running statistics would.
"""

from __future__ import annotations

import math

from torch import nn

from model.errors import ModelError

# Channels double from the first convolution's; 32 keeps the stem's cost about that of the
# three transformer blocks of cots-tiny-p16 (docs/results.md).
FIRST_CHANNELS = 32
STRIDE2_CONVS = 2


def conv_stem(patch_size: int, width: int, first_channels: int = FIRST_CHANNELS) -> nn.Sequential:
    """A stem mapping [B, 3, S, S] to [B, width, S/patch_size, S/patch_size]."""
    levels = math.log2(patch_size)
    if patch_size < 2 ** (STRIDE2_CONVS + 1) or levels != int(levels):
        raise ModelError(
            f"a conv stem needs a power-of-two patch size of at least {2 ** (STRIDE2_CONVS + 1)}, "
            f"got {patch_size}"
        )
    layers: list[nn.Module] = []
    channels_in, channels = 3, first_channels
    for _ in range(STRIDE2_CONVS):
        layers += [
            nn.Conv2d(channels_in, channels, 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(max(1, channels // 16), channels),
            nn.GELU(),
        ]
        channels_in, channels = channels, channels * 2
    rest = patch_size // 2**STRIDE2_CONVS
    layers.append(nn.Conv2d(channels_in, width, rest, stride=rest))
    return nn.Sequential(*layers)


def add_conv_stem(visual: nn.Module) -> None:
    """Replace an open_clip ViT's patch embedding (``visual.conv1``) by :func:`conv_stem`."""
    patch = getattr(visual, "conv1", None)
    if not isinstance(patch, nn.Conv2d):
        raise ModelError("a conv stem needs a ViT image tower (patch embedding conv1)")
    kernel = patch.kernel_size[0]
    visual.conv1 = conv_stem(int(kernel), int(patch.out_channels))
