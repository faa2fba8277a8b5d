"""`he-stats`: a non-learned baseline encoder of colour and texture statistics of H&E patches.

Per region (the whole patch, or each cell of a token grid): RGB and optical-density (OD) means/stds, H, E
and DAB stain densities from Ruifrok & Johnston colour deconvolution (the scikit-image ``rgb2hed`` matrix),
H/E quantiles, fractions of dark (nuclear) and background pixels, and gradient-magnitude texture. It is a
torch module so it runs through the same preprocessing/encode path as the learned backbones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genedml.backbones.token_cells import cell_bounds
from genedml.errors import GenedmlError

# Ruifrok & Johnston (2001) stain OD vectors, rows = haematoxylin, eosin, DAB (as in skimage.color).
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
QUANTILES = (0.1, 0.5, 0.9)
QUANTILE_STRIDE = 4
DARK_BELOW = 0.4  # grey level (0..1) under which a pixel counts as dark, i.e. mostly nuclear chromatin
BACKGROUND_ABOVE = 0.85  # grey level above which a pixel counts as glass/background

HE_STATS_FEATURES: tuple[str, ...] = (
    *(f"{stat}_{c}" for stat in ("mean", "std") for c in ("r", "g", "b")),
    *(f"od_{stat}_{c}" for stat in ("mean", "std") for c in ("r", "g", "b")),
    *(f"{c}_{stat}" for stat in ("mean", "std") for c in ("hema", "eosin", "dab")),
    "od_total_mean", "od_total_std",
    *(f"{c}_q{int(q * 100)}" for c in ("hema", "eosin") for q in QUANTILES),
    "dark_fraction", "background_fraction",
    "grad_mean", "grad_std", "grad_q90", "hema_grad_mean",
)


class HEStats(nn.Module):
    """Maps [B, 3, S, S] RGB in [0, 1] to statistics tokens [B, 1 + g², 32] (token 0 = whole patch)."""

    dim = len(HE_STATS_FEATURES)

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("hed_from_rgb", torch.linalg.inv(RGB_FROM_HED).float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-patch statistics [B, 32]."""
        return self.tokens(x, 0)[:, 0]

    def tokens(self, x: torch.Tensor, token_grid: int) -> torch.Tensor:
        """Statistics of the whole patch, then of each cell of a token_grid × token_grid grid, row-major."""
        if token_grid < 0:
            raise GenedmlError("he-stats has no patch tokens: --local-tokens all needs a timm backbone")
        with torch.autocast(device_type=x.device.type, enabled=False):
            maps = self._pixel_maps(x.float().clamp(0, 1))
            whole = self._region_stats(maps.flatten(2))[:, None]
            if token_grid <= 0:
                return whole
            return torch.cat([whole, self._cell_stats(maps, token_grid)], 1)

    def _cell_stats(self, maps: torch.Tensor, grid: int) -> torch.Tensor:
        """[B, grid², 32]; equal cells are batched in one pass, uneven ones (e.g. 224 / 3) looped."""
        batch, channels, height, width = maps.shape
        if height % grid == 0 and width % grid == 0:
            cells = maps.reshape(batch, channels, grid, height // grid, grid, width // grid)
            cells = cells.permute(0, 2, 4, 1, 3, 5).reshape(batch * grid * grid, channels, -1)
            return self._region_stats(cells).view(batch, grid * grid, -1)
        rows, cols = cell_bounds(height, grid), cell_bounds(width, grid)
        return torch.stack([self._region_stats(maps[..., r0:r1, c0:c1].flatten(2))
                            for r0, r1 in rows for c0, c1 in cols], 1)

    def _pixel_maps(self, rgb: torch.Tensor) -> torch.Tensor:
        """Per-pixel channels [B, 13, H, W]: rgb, od, hed, od total, grey, gradient, H gradient."""
        # Beer-Lambert optical density on 8-bit intensities (+1 keeps white finite and black bounded).
        od = -torch.log((rgb * 255.0 + 1.0) / 256.0)
        hed = torch.einsum("bchw,cd->bdhw", od, self.hed_from_rgb).clamp_min(0)
        grey = (rgb * rgb.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return torch.cat([rgb, od, hed, od.sum(1, keepdim=True), grey, _gradient(grey), _gradient(hed[:, :1])], 1)

    @staticmethod
    def _region_stats(flat: torch.Tensor) -> torch.Tensor:
        """The 32 statistics of flattened pixel maps [N, 13, P] → [N, 32]."""
        colour = flat[:, 0:9]
        od_total, grey, grad, hema_grad = flat[:, 9], flat[:, 10], flat[:, 11], flat[:, 12]
        # Quantiles from a regular 1-in-4 pixel sample: sorting dominates the cost, and 12k of a 224² patch's
        # 50k pixels pin the 10/50/90 % quantiles to well under 1 % of their range.
        stride = QUANTILE_STRIDE if flat.shape[-1] >= QUANTILE_STRIDE * 1024 else 1
        he_sorted = flat[:, 6:8, ::stride].sort(-1).values
        n = he_sorted.shape[-1]
        q_idx = torch.tensor([round(q * (n - 1)) for q in QUANTILES], device=flat.device)
        grad_q90 = grad[:, ::stride].sort(-1).values[:, round(0.9 * (n - 1))]
        feats = [
            colour[:, 0:3].mean(-1), colour[:, 0:3].std(-1, correction=0),
            colour[:, 3:6].mean(-1), colour[:, 3:6].std(-1, correction=0),
            colour[:, 6:9].mean(-1), colour[:, 6:9].std(-1, correction=0),
            od_total.mean(-1, keepdim=True), od_total.std(-1, correction=0, keepdim=True),
            he_sorted[..., q_idx].flatten(1),
            (grey < DARK_BELOW).float().mean(-1, keepdim=True),
            (grey > BACKGROUND_ABOVE).float().mean(-1, keepdim=True),
            grad.mean(-1, keepdim=True), grad.std(-1, correction=0, keepdim=True), grad_q90[:, None],
            hema_grad.mean(-1, keepdim=True),
        ]
        return torch.cat(feats, 1)


def _gradient(channel: torch.Tensor) -> torch.Tensor:
    """Central-difference gradient magnitude of a [B, 1, H, W] map, same size (replicate border)."""
    padded = F.pad(channel, (1, 1, 1, 1), mode="replicate")
    gx = (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2]) / 2
    gy = (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1]) / 2
    return torch.sqrt(gx * gx + gy * gy)
