"""Per-dimension standardisation of backbone features, with one set of statistics per token type.

A backbone's pooled/CLS vector, its patch tokens and the encoded neighbour tiles are different populations:
a ViT's patch tokens are not centred where its CLS token is, and neighbour tiles include background that
spots rarely cover. Each type is standardised with its own training statistics:

    pooled  local token 0 of every spot (and the slide tokens of the global scale, which are those vectors)
    patch   local tokens 1.. (the pooled patch grid or every patch token); absent for `cls` caches
    tile    neighbour tiles that at least one spot uses (off-image tiles are masked and never seen)

Statistics are accumulated slide by slide in float64 (Chan's parallel update), so a fit that streams slides
from the cache computes exactly the statistics of a fit that holds them all in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch

from genedml.heads.features import SpotFeatures

TOKEN_TYPES = ("pooled", "patch", "tile")
_ROWS_PER_CHUNK = 1 << 15  # vectors converted to float64 at a time (bounds memory for `all`-token caches)


class Moments:
    """Running count, mean and sum of squared deviations of D-vectors (float64, chunked, mergeable)."""

    def __init__(self, dim: int) -> None:
        self.n = 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros(dim, np.float64)

    def add(self, x: np.ndarray) -> None:
        """Fold the rows of x (K, D) in, a chunk at a time."""
        for start in range(0, len(x), _ROWS_PER_CHUNK):
            chunk = np.asarray(x[start : start + _ROWS_PER_CHUNK], dtype=np.float64)
            n = len(chunk)
            if n == 0:
                continue
            mean = chunk.mean(0)
            m2 = ((chunk - mean) ** 2).sum(0)
            total = self.n + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
            self.n = total

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and unbiased std as float32 tensors; near-constant dimensions get std 1 (centred only)."""
        std = np.sqrt(self.m2 / max(self.n - 1, 1))
        floor = 1e-6 * max(float(std.max(initial=0.0)), 1e-12)
        std = np.where(std > floor, std, 1.0)
        return torch.from_numpy(self.mean).float(), torch.from_numpy(std).float()


def token_moments(parts: Iterable[SpotFeatures]) -> dict[str, Moments]:
    """Moments of every token type over the spots of `parts` (the training set, whole or slide by slide).

    A type with no vectors (no patch tokens, no neighbour scale) is left out.
    """
    moments: dict[str, Moments] = {}

    def add(kind: str, x: np.ndarray) -> None:
        if len(x):
            moments.setdefault(kind, Moments(x.shape[-1])).add(x)

    for feats in parts:
        add("pooled", feats.local[:, 0, :])
        if feats.local.shape[1] > 1:
            add("patch", feats.local[:, 1:, :].reshape(-1, feats.dim))
        if feats.has_neighbor:
            mask = np.ones(feats.neighbor_index.shape, bool) if feats.neighbor_mask is None else feats.neighbor_mask
            add("tile", feats.tiles[np.unique(feats.neighbor_index[mask])])
    return moments


@dataclass
class FeatureScaler:
    """(mean, std) per token type on one device (a type the training set lacked holds the pooled statistics)."""

    pooled: tuple[torch.Tensor, torch.Tensor]
    patch: tuple[torch.Tensor, torch.Tensor]
    tile: tuple[torch.Tensor, torch.Tensor]

    @staticmethod
    def _apply(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mean, std = stats
        return (x - mean) / std

    def pooled_vectors(self, x: torch.Tensor) -> torch.Tensor:
        """(…, D) pooled/CLS vectors (local token 0, the global scale's slide tokens)."""
        return self._apply(x, self.pooled)

    def local_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) local tokens: token 0 with the pooled statistics, tokens 1.. with the patch statistics."""
        if x.shape[1] == 1:
            return self._apply(x, self.pooled)
        return torch.cat([self._apply(x[:, :1], self.pooled), self._apply(x[:, 1:], self.patch)], dim=1)

    def tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 25, D) neighbour tiles."""
        return self._apply(x, self.tile)
