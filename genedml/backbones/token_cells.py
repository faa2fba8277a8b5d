"""The cells of a compact local-token grid (`--local-tokens 2x2|4x4`): which backbone tokens each cell holds.

A cell is a block of the backbone's token map (or of the patch's pixels for `he-stats`). The cells partition
the map: every token belongs to exactly one cell, and a cell's weight is its token count. (Adaptive average
pooling would make the cells of a 14 × 14 map overlap on a 4 × 4 grid, so equal weights of 196 / 16 would
misstate both the cells and their share of the patch.)
"""

from __future__ import annotations

import torch


def cell_bounds(size: int, grid: int) -> list[tuple[int, int]]:
    """[start, end) of `grid` contiguous bands that split `size` positions with sizes differing by at most 1."""
    if grid < 1 or size < grid:
        raise ValueError(f"cannot split {size} positions into {grid} non-empty cells")
    edges = [i * size // grid for i in range(grid + 1)]
    return list(zip(edges[:-1], edges[1:]))


def cell_membership(height: int, width: int, grid: int, device: torch.device | str) -> torch.Tensor:
    """[grid², height·width] bool, row-major cells: which tokens of a height × width map each cell holds."""

    def bands(size: int) -> torch.Tensor:  # [grid, size]
        position = torch.arange(size, device=device)
        return torch.stack([(position >= start) & (position < end) for start, end in cell_bounds(size, grid)])

    rows, cols = bands(height), bands(width)
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(grid * grid, height * width)


def cell_sizes(height: int, width: int, grid: int) -> list[int]:
    """How many tokens each row-major cell holds (they sum to height · width)."""
    return [(r1 - r0) * (c1 - c0) for r0, r1 in cell_bounds(height, grid) for c0, c1 in cell_bounds(width, grid)]


def pool_cells(feature_map: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, C, H, W] → [B, grid², C]: the mean of each cell's tokens."""
    _, _, height, width = feature_map.shape
    members = cell_membership(height, width, grid, feature_map.device).to(feature_map.dtype)
    means = members / members.sum(1, keepdim=True)
    return torch.einsum("gn,bcn->bgc", means, feature_map.flatten(2))
