"""Synthetic vectors clustered like real embeddings, for tests and benchmarks.

A Gaussian mixture in a low-dimensional latent space, mapped into ``dim`` dimensions with a
little isotropic noise, then L2-normalised. Uniform random vectors would make every approximate
index look bad (no structure to exploit) and a tight mixture would make them all look perfect.
"""

from __future__ import annotations

import numpy as np


class Mixture:
    """Clustered unit vectors: ``clusters`` Gaussians (log-normal weights, so cluster sizes are
    uneven as in real collections) in ``latent`` dims, a fixed random map to ``dim`` dims, plus
    isotropic noise, then L2-normalised. Seeded: the same arguments give the same vectors."""

    def __init__(
        self,
        dim: int,
        *,
        clusters: int = 1024,
        latent: int = 24,
        spread: float = 0.6,
        noise: float = 0.3,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self.centres = rng.standard_normal((clusters, latent)).astype(np.float32)
        weights = np.exp(rng.standard_normal(clusters))
        self.weights = weights / weights.sum()
        self.scales = (spread * np.exp(0.3 * rng.standard_normal(clusters))).astype(np.float32)
        self.mapping = (rng.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
        self.noise = noise

    def sample(self, count: int, seed: int, chunk: int = 262_144) -> np.ndarray:
        """``count`` unit vectors [count, dim] float32, drawn with ``seed``."""
        rng = np.random.default_rng(seed)
        out = np.empty((count, self.dim), dtype=np.float32)
        latent = self.centres.shape[1]
        for start in range(0, count, chunk):
            n = min(chunk, count - start)
            which = rng.choice(len(self.weights), size=n, p=self.weights)
            z = self.centres[which] + self.scales[which, None] * rng.standard_normal(
                (n, latent), dtype=np.float32
            )
            x = z @ self.mapping
            x += (
                self.noise
                * rng.standard_normal((n, self.dim), dtype=np.float32)
                / np.sqrt(self.dim / latent, dtype=np.float32)
            )
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            out[start : start + n] = x
        return out
