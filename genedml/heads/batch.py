"""Turn rows of `SpotFeatures` into torch mini-batches (local view sampling, slide-level global inputs)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genedml.errors import InputError
from genedml.heads.features import NEIGHBOR_TILES, SpotFeatures
from genedml.heads.scaling import FeatureScaler


@dataclass
class Batch:
    """Tensors of B spots on one device.

    local (B, T, D); neighbor (B, 25, D) | None; neighbor_mask (B, 25) bool | None;
    slide_tokens / slide_grid: per slide present in the batch, all of that slide's pooled tokens (M_s, D) and
    grid positions (M_s, 2); slot (B,) the index of each spot's slide in those lists; slide_pos (B,) the row
    of each spot inside its slide's arrays; token_weights (T,) backbone tokens per local token, or None.
    """

    local: torch.Tensor
    neighbor: torch.Tensor | None
    neighbor_mask: torch.Tensor | None
    slide_tokens: list[torch.Tensor]
    slide_grid: list[torch.Tensor]
    slot: torch.Tensor
    slide_pos: torch.Tensor
    token_weights: torch.Tensor | None = None
    slide_ids: tuple[int, ...] = ()  # the slide index of each entry of slide_tokens (cache keys in eval)

    def __len__(self) -> int:
        return int(self.local.shape[0])


class BatchMaker:
    """Builds `Batch`es from one `SpotFeatures`; converts each slide's global inputs once and keeps them."""

    def __init__(
        self,
        feats: SpotFeatures,
        device: torch.device | str = "cpu",
        need_neighbor: bool = False,
        scaler: FeatureScaler | None = None,
    ):
        if need_neighbor and not feats.has_neighbor:
            raise InputError(
                "the neighbour scale is enabled but the features have no `neighbor` array; "
                "extract the cache with the neighbour scale or drop 'neighbor' from the scales"
            )
        if feats.has_neighbor and feats.neighbor_index.shape[1] != NEIGHBOR_TILES:
            raise InputError(f"`neighbor_index` has {feats.neighbor_index.shape[1]} tiles per spot, expected {NEIGHBOR_TILES}")
        self.feats = feats
        self.device = torch.device(device)
        self.scaler = scaler
        self._slides: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        weights = feats.token_weights
        self._token_weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32).to(self.device)

    def _tensor(self, array: np.ndarray, kind: str) -> torch.Tensor:
        """Backbone features as float32 on the device, standardised per token type (`kind`: "pooled",
        "local" or "tiles"; see `genedml.heads.scaling`) when a scaler is set."""
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)
        if self.scaler is None:
            return x
        if kind == "pooled":
            return self.scaler.pooled_vectors(x)
        return self.scaler.local_tokens(x) if kind == "local" else self.scaler.tiles(x)

    def _slide(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        if s not in self._slides:
            if s not in self.feats.slide_tokens or s not in self.feats.slide_grid:
                raise InputError(f"slide {self.feats.sample_ids[s]!r} has no slide-level tokens for the global scale")
            tokens = self._tensor(self.feats.slide_tokens[s], "pooled")
            grid = torch.from_numpy(np.asarray(self.feats.slide_grid[s], dtype=np.int64)).to(self.device)
            self._slides[s] = (tokens, grid)
        return self._slides[s]

    def make(self, index: np.ndarray, generator: torch.Generator | None = None) -> Batch:
        """Rows `index`; with a generator (training) and `local_aug`, one random dihedral view per spot."""
        feats = self.feats
        if generator is not None and feats.local_aug is not None:
            views = torch.randint(0, feats.local_aug.shape[1], (len(index),), generator=generator).numpy()
            local = feats.local_aug[index, views]
        else:
            local = feats.local[index]
        slides = feats.slide[index]
        present = np.unique(slides)
        slot = np.searchsorted(present, slides)
        pairs = [self._slide(int(s)) for s in present]
        neighbor = mask = None
        if feats.has_neighbor:  # gathered per batch from the shared tiles (features stay compact in memory)
            tiles, valid = feats.neighbors_of(index)
            neighbor = self._tensor(tiles, "tiles")
            mask = torch.from_numpy(valid).to(self.device)
        return Batch(
            local=self._tensor(local, "local"),
            neighbor=neighbor,
            neighbor_mask=mask,
            slide_ids=tuple(int(s) for s in present),
            slide_tokens=[p[0] for p in pairs],
            slide_grid=[p[1] for p in pairs],
            slot=torch.from_numpy(slot).to(self.device),
            slide_pos=torch.from_numpy(np.asarray(feats.slide_pos[index], dtype=np.int64)).to(self.device),
            token_weights=self._token_weights,
        )
