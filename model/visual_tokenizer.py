"""The visual tokenizer for masked vision modeling: a small VQ-VAE over the patch grid.

The encoder downsamples by the image tower's patch size, so every patch of the tower's grid
gets one codebook id; masked vision modeling predicts those ids.

Cost: each stride-2 stage doubles the channels, so the widest convolutions run only at the
patch-grid resolution and the full-resolution layers have a handful of channels (the decoder
mirrors this). A 64-px step at batch 128 takes ~0.3 s on one CPU thread, not ~5 s.

Codebook usage: codes are looked up by cosine similarity in a low-dimensional space (encoder
outputs and codes are l2-normalised), so the lookup depends on direction alone and no code can
be stranded far from the data by a change of scale. The codebook starts from k-means on the
first batch's encoder outputs, follows exponential moving averages (stable without a codebook
loss), and codes whose recent usage falls to a small fraction of their fair share are restarted
on the worst-reconstructed encoder outputs of the batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ModelError

FORMAT = "cots-visual-tokenizer"


@dataclass(frozen=True)
class TokenizerConfig:
    image_size: int = 64
    patch_size: int = 8
    codebook_size: int = 256
    code_dim: int = 16  # lookup space: low-dimensional so that many codes stay in use
    hidden: int = 64  # channels at the patch grid; halved at each finer resolution
    decay: float = 0.9  # short memory: a default run is only a few hundred steps
    commitment: float = 0.25
    # a code is restarted when its moving-average usage falls below this share of its fair
    # share (patches per batch / codebook_size)
    dead_fraction: float = 0.2
    kmeans_iters: int = 10

    def __post_init__(self) -> None:
        levels = math.log2(self.patch_size)
        if self.patch_size < 2 or levels != int(levels):
            raise ModelError(f"patch_size must be a power of two >= 2, got {self.patch_size}")
        if self.image_size % self.patch_size:
            raise ModelError(f"image_size {self.image_size} is not a multiple of {self.patch_size}")
        if self.codebook_size < 2 or self.code_dim < 2 or self.hidden < 1:
            raise ModelError("codebook_size and code_dim must be >= 2 and hidden >= 1")
        if not 0.0 <= self.decay < 1.0:
            raise ModelError(f"decay must be in [0, 1), got {self.decay}")


def _widths(levels: int, hidden: int) -> list[int]:
    """Channels after each stride-2 stage, finest first: narrow where the maps are large."""
    return [max(hidden >> (levels - 1 - i), min(hidden, 8)) for i in range(levels)]


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _encoder(levels: int, hidden: int, out: int) -> nn.Sequential:
    widths = _widths(levels, hidden)
    layers: list[nn.Module] = []
    previous = 3
    for i, width in enumerate(widths):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Conv2d(previous, width, 4, stride=2, padding=1))
        previous = width
    layers += [_Residual(previous), _Residual(previous), nn.GELU(), nn.Conv2d(previous, out, 1)]
    return nn.Sequential(*layers)


def _decoder(levels: int, hidden: int, inp: int) -> nn.Sequential:
    widths = _widths(levels, hidden)[::-1]
    layers: list[nn.Module] = [nn.Conv2d(inp, widths[0], 3, padding=1)]
    layers += [_Residual(widths[0]), _Residual(widths[0])]
    for i, width in enumerate(widths):
        after = widths[i + 1] if i + 1 < levels else 3
        layers += [nn.GELU(), nn.ConvTranspose2d(width, after, 4, stride=2, padding=1)]
    return nn.Sequential(*layers)


class VisualTokenizer(nn.Module):
    codebook: torch.Tensor
    cluster_size: torch.Tensor
    cluster_sum: torch.Tensor
    initialised: torch.Tensor

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        levels = int(math.log2(config.patch_size))
        self.encoder = _encoder(levels, config.hidden, config.code_dim)
        self.decoder = _decoder(levels, config.hidden, config.code_dim)
        codebook = F.normalize(torch.randn(config.codebook_size, config.code_dim), dim=1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(config.codebook_size))
        self.register_buffer("cluster_sum", codebook.clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.patch_size
        return side, side

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-length lookup vectors [B*H*W, code_dim], row-major over the patch grid."""
        z = self.encoder(images)
        return F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1)

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Code ids [N] of unit vectors [N, C]: the largest cosine similarity."""
        return (flat @ self.codebook.t()).argmax(dim=1)

    def _to_image(self, flat: torch.Tensor, batch: int) -> torch.Tensor:
        h, w = self.grid
        # unit vectors have components of size 1/sqrt(dim): rescaled to the unit variance the
        # default conv init expects, the decoder starts learning at once instead of plateauing
        z = flat * math.sqrt(self.config.code_dim)
        return self.decoder(z.view(batch, h, w, -1).permute(0, 3, 1, 2))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] (normalised) -> code ids [B, H*W], row-major over the patch grid."""
        return self._nearest(self._embed(images)).view(images.shape[0], -1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids [B, H*W] -> reconstructed images [B, 3, S, S]."""
        return self._to_image(self.codebook[ids.reshape(-1)], ids.shape[0])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, loss, code ids [B*H*W]); updates the codebook when training."""
        flat = self._embed(images)
        if self.training and not bool(self.initialised):
            self._init_from(flat.detach())
        ids = self._nearest(flat.detach())
        quantised = self.codebook[ids]
        commitment = F.mse_loss(flat, quantised)
        # straight-through: the decoder sees the codes, the encoder gets the decoder's gradient
        straight = flat + (quantised - flat).detach()
        reconstruction = self._to_image(straight, images.shape[0])
        if self.training:
            self._ema_update(flat.detach(), ids, quantised)
        loss = F.mse_loss(reconstruction, images) + self.config.commitment * commitment
        return reconstruction, loss, ids

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        """Spherical k-means on the first batch: codes spread over the encoder outputs from the
        start, rather than a few random codes near the data taking every patch."""
        k = self.config.codebook_size
        picks = torch.randint(len(flat), (k,), device=flat.device)
        centres = flat[picks].clone()
        for _ in range(self.config.kmeans_iters):
            ids = (flat @ centres.t()).argmax(dim=1)
            sums = torch.zeros_like(centres).index_add_(0, ids, flat)
            counts = torch.bincount(ids, minlength=k)
            # an empty cluster keeps its centre; the dead-code restarts deal with it later
            centres = torch.where((counts > 0).unsqueeze(1), F.normalize(sums, dim=1), centres)
        self.codebook.copy_(centres)
        self.cluster_sum.copy_(centres * (len(flat) / k))
        self.cluster_size.fill_(len(flat) / k)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor, quantised: torch.Tensor) -> None:
        k, decay = self.config.codebook_size, self.config.decay
        counts = torch.bincount(ids, minlength=k).to(flat.dtype)
        sums = torch.zeros_like(self.cluster_sum).index_add_(0, ids, flat)
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.cluster_sum.mul_(decay).add_(sums, alpha=1 - decay)
        # on the sphere the mean direction is the centroid, so no count normalisation is needed
        self.codebook.copy_(F.normalize(self.cluster_sum, dim=1))
        fair = len(flat) / k
        dead = self.cluster_size < self.config.dead_fraction * fair
        n_dead = int(dead.sum())
        if n_dead:
            # restart on the outputs the codebook serves worst, so new codes go where needed
            error = (flat - quantised).pow(2).sum(1) + 1e-6
            picks = torch.multinomial(error, n_dead, replacement=n_dead > len(flat))
            self.codebook[dead] = flat[picks]
            self.cluster_sum[dead] = flat[picks] * fair
            self.cluster_size[dead] = fair


def codebook_stats(ids: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Usage (fraction of codes used) and perplexity of a set of code ids."""
    counts = torch.bincount(ids.flatten(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {"usage": float((counts > 0).float().mean()), "perplexity": float(entropy.exp())}


def save_tokenizer(tokenizer: VisualTokenizer, path: Path, metrics: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(
        {
            "format": FORMAT,
            "config": asdict(tokenizer.config),
            "state": tokenizer.state_dict(),
            "metrics": metrics,
        },
        tmp,
    )
    tmp.replace(path)


def load_tokenizer(path: Path) -> VisualTokenizer:
    """Pretrained weights from a local file written by :func:`save_tokenizer`."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(f"visual tokenizer {path} does not exist") from None
    except Exception as error:
        raise ModelError(f"{path} is not a loadable visual tokenizer: {error}") from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ModelError(f"{path} is not a COTS visual tokenizer (format {FORMAT!r} expected)")
    try:
        tokenizer = VisualTokenizer(TokenizerConfig(**saved["config"]))
        tokenizer.load_state_dict(saved["state"])
    except (KeyError, TypeError, RuntimeError) as error:
        # e.g. a file from an older tokenizer layout: say so rather than fail deep in torch
        raise ModelError(
            f"{path} does not match this version of the visual tokenizer: {error}"
        ) from None
    return tokenizer.eval()
