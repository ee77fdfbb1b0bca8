"""The visual tokenizer for masked vision modeling: a small VQ-VAE over the patch grid.

The encoder downsamples by the image tower's patch size, so every patch of the tower's grid
gets one codebook id; masked vision modeling predicts those ids. The codebook is updated by
exponential moving averages (stable without a codebook loss) and codes that fall out of use
are restarted on random encoder outputs, which keeps usage high.
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
    codebook_size: int = 512
    code_dim: int = 64
    hidden: int = 64
    decay: float = 0.99
    commitment: float = 0.25

    def __post_init__(self) -> None:
        levels = math.log2(self.patch_size)
        if self.patch_size < 2 or levels != int(levels):
            raise ModelError(f"patch_size must be a power of two >= 2, got {self.patch_size}")
        if self.image_size % self.patch_size:
            raise ModelError(f"image_size {self.image_size} is not a multiple of {self.patch_size}")


def _down(levels: int, hidden: int, out: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(3, hidden, 3, padding=1), nn.GELU()]
    for _ in range(levels):
        layers += [nn.Conv2d(hidden, hidden, 4, stride=2, padding=1), nn.GELU()]
    layers.append(nn.Conv2d(hidden, out, 1))
    return nn.Sequential(*layers)


def _up(levels: int, hidden: int, inp: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(inp, hidden, 3, padding=1), nn.GELU()]
    for _ in range(levels):
        layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.GELU()]
    layers.append(nn.Conv2d(hidden, 3, 3, padding=1))
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
        self.encoder = _down(levels, config.hidden, config.code_dim)
        self.decoder = _up(levels, config.hidden, config.code_dim)
        self.register_buffer("codebook", torch.randn(config.codebook_size, config.code_dim))
        self.register_buffer("cluster_size", torch.ones(config.codebook_size))
        self.register_buffer("cluster_sum", self.codebook.clone())
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.patch_size
        return side, side

    def _nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Code ids [N] of vectors z [N, C]."""
        distances = (
            z.pow(2).sum(1, keepdim=True) - 2 * z @ self.codebook.t() + self.codebook.pow(2).sum(1)
        )
        return distances.argmin(dim=1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] (normalised) -> code ids [B, H*W], row-major over the patch grid."""
        z = self.encoder(images)  # [B, C, H, W]
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return self._nearest(flat).view(images.shape[0], -1)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Code ids [B, H*W] -> reconstructed images [B, 3, S, S]."""
        h, w = self.grid
        z = self.codebook[ids].view(ids.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.decoder(z)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, loss, code ids [B*H*W]); updates the codebook when training."""
        z = self.encoder(images)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if self.training and not bool(self.initialised):
            self._init_from(flat.detach())
        ids = self._nearest(flat.detach())
        quantised = self.codebook[ids]
        if self.training:
            self._ema_update(flat.detach(), ids)
        commitment = F.mse_loss(flat, quantised.detach())
        # straight-through: the decoder sees the codes, the encoder gets the decoder's gradient
        straight = flat + (quantised - flat).detach()
        z_q = straight.view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
        reconstruction = self.decoder(z_q)
        loss = F.mse_loss(reconstruction, images) + self.config.commitment * commitment
        return reconstruction, loss, ids

    @torch.no_grad()
    def _init_from(self, flat: torch.Tensor) -> None:
        """Codes start on random encoder outputs: a random codebook far from them would send
        every patch to one code, and the decoder would learn only the mean image."""
        picks = torch.randint(len(flat), (self.config.codebook_size,), device=flat.device)
        self.codebook.copy_(flat[picks])
        self.cluster_sum.copy_(flat[picks])
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, ids: torch.Tensor) -> None:
        one_hot = F.one_hot(ids, self.config.codebook_size).type(flat.dtype)
        decay = self.config.decay
        self.cluster_size.mul_(decay).add_(one_hot.sum(0), alpha=1 - decay)
        self.cluster_sum.mul_(decay).add_(one_hot.t() @ flat, alpha=1 - decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + 1e-5) / (n + self.config.codebook_size * 1e-5) * n
        self.codebook.copy_(self.cluster_sum / smoothed.unsqueeze(1))
        # restart dead codes on random encoder outputs of this batch
        dead = self.cluster_size < 1e-2
        if bool(dead.any()):
            picks = torch.randint(len(flat), (int(dead.sum()),), device=flat.device)
            self.codebook[dead] = flat[picks]
            self.cluster_sum[dead] = flat[picks]
            self.cluster_size[dead] = 1.0


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
    tokenizer = VisualTokenizer(TokenizerConfig(**saved["config"]))
    tokenizer.load_state_dict(saved["state"])
    return tokenizer.eval()
