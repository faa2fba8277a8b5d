"""Building blocks of the scale encoders (method.md §1.2): pre-norm transformer blocks, the neighbour encoder
with a LeViT-style 2-D relative-position bias, the global encoder with a PEG, fusion, projection heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genedml.errors import InputError

GRID_SIDE = 5  # the neighbour scale is a 5 x 5 grid of tiles, row-major
MAX_GRID_CELLS = 16_000_000  # a dense PEG grid larger than this means `grid` holds pixels, not array positions


def masked_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive key bias (B, 1, 1, L): 0 for valid keys, a large negative value for masked ones.

    A row whose keys are all masked gets no bias at all (uniform attention) instead of NaNs.
    """
    none_valid = ~valid.any(dim=-1, keepdim=True)
    keep = valid | none_valid
    neg = torch.finfo(dtype).min / 4  # finite: adding a bias or the scores must not overflow to -inf
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~keep, neg)
    return bias[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention with an optional additive bias (broadcast to (B, H, L, L)).

    As the reference modules: the qkv projection has no bias, attention probabilities are not dropped, and
    the output projection (Linear → Dropout) exists only with more than one head (identity for one head).
    """

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout)) if heads > 1 else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if bias is not None:
            bias = bias.to(q.dtype)
        # SDPA picks a fused (memory-efficient / flash) kernel where it can: no L x L matrix is kept.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attention(LN(x)); x + FeedForward(LN(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


def _relative_offset_index(side: int) -> torch.Tensor:
    """(side², side²) index of the offset (|Δrow|, |Δcol|) between every pair of grid cells."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    d_row = (rows[:, None] - rows[None, :]).abs()
    d_col = (cols[:, None] - cols[None, :]).abs()
    return d_row * side + d_col


class NeighborEncoder(nn.Module):
    """Transformer over the 25 neighbour tiles with a learnable relative-position bias and the tile mask."""

    def __init__(self, dim: int, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.3):
        super().__init__()
        self.heads = heads
        self.blocks = nn.ModuleList(Block(dim, heads, int(dim * mlp_ratio), dropout) for _ in range(depth))
        # LeViT: one scalar per head per offset, separately for each layer.
        self.rel_bias = nn.Parameter(torch.zeros(depth, heads, GRID_SIDE * GRID_SIDE))
        self.register_buffer("rel_index", _relative_offset_index(GRID_SIDE), persistent=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tiles: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """tiles (B, 25, D), valid (B, 25) bool → (B, 25, D); masked tiles neither see nor are seen."""
        if valid is not None:
            # Zero masked inputs so their (undefined) features cannot leak through their own residual path.
            tiles = tiles * valid[..., None].to(tiles.dtype)
            key_bias = masked_bias(valid, tiles.dtype)
        x = tiles
        for i, block in enumerate(self.blocks):
            bias = self.rel_bias[i][:, self.rel_index][None]  # (1, H, 25, 25)
            if valid is not None:
                bias = bias + key_bias
            x = block(x, bias)
        return self.norm(x)


class PEG(nn.Module):
    """Positional encoding generator: 3x3 depth-wise conv over the dense spot grid, plus residual.

    Tokens are scattered into a dense grid by position, convolved and gathered back in INPUT order
    (the reference reads back in sorted-position order, which is only right for pre-sorted spots).
    Spots sharing a cell are summed in that cell (order-independent).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """tokens (M, D), grid (M, 2) int (x = column, y = row) → (M, D)."""
        col = grid[:, 0] - grid[:, 0].min()
        row = grid[:, 1] - grid[:, 1].min()
        height, width = int(row.max()) + 1, int(col.max()) + 1
        if height * width > MAX_GRID_CELLS:
            raise InputError(
                f"spot grid spans {height} x {width} cells; `grid` must hold array (row/col) positions, "
                "not pixel coordinates"
            )
        cell = row * width + col
        dense = tokens.new_zeros(height * width, tokens.shape[1]).index_add(0, cell, tokens)
        dense = dense.T.reshape(1, -1, height, width)
        conv = self.conv(dense).reshape(tokens.shape[1], -1).T
        return tokens + conv[cell]


class GlobalEncoder(nn.Module):
    """One block → PEG → depth−1 blocks → LayerNorm over all spots of one slide.

    Attention is exact (every spot attends to every spot, through SDPA's memory-efficient kernels) up to
    `window_above` spots; a larger slide attends within windows of `window` × `window` grid cells (local
    windows, as STFlow does for whole slides). The PEG convolution always sees the whole slide.
    """

    def __init__(self, dim: int, depth: int = 5, heads: int = 8, mlp_ratio: float = 4.0, dropout: float = 0.3,
                 window: int = 64, window_above: int = 20_000):
        super().__init__()
        if depth < 1:
            raise ValueError("global encoder depth must be >= 1")
        self.blocks = nn.ModuleList(Block(dim, heads, int(dim * mlp_ratio), dropout) for _ in range(depth))
        self.peg = PEG(dim)
        self.norm = nn.LayerNorm(dim)
        self.window = window
        self.window_above = window_above

    def forward(self, tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """tokens (M, D), grid (M, 2) → (M, D), one output token per input spot, same order."""
        if len(tokens) > self.window_above:
            return self._windowed(tokens, grid)
        x = self.blocks[0](tokens[None])
        x = self.peg(x[0], grid)[None]
        for block in self.blocks[1:]:
            x = block(x)
        return self.norm(x)[0]

    def _windowed(self, tokens: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """The same layers with attention restricted to spots in the same window of grid cells."""
        groups, key_valid, order = window_groups(grid, self.window)
        bias = masked_bias(key_valid, tokens.dtype)

        def attend(block: Block, x: torch.Tensor) -> torch.Tensor:
            padded = x.new_zeros(key_valid.shape + (x.shape[-1],))
            padded[key_valid] = x[order]
            out = block(padded, bias)[key_valid]
            return torch.empty_like(x).index_copy_(0, order, out)

        x = attend(self.blocks[0], tokens)
        x = self.peg(x, grid)
        for block in self.blocks[1:]:
            x = attend(block, x)
        return self.norm(x)


def window_groups(grid: torch.Tensor, window: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Spots grouped by window of `window` x `window` grid cells: (number of windows, (W, L) validity of the
    padded groups, the spot order that fills the valid slots row by row)."""
    cell = (grid - grid.min(0).values) // window
    key = cell[:, 1] * (int(cell[:, 0].max()) + 1) + cell[:, 0]
    key_sorted, order = torch.sort(key, stable=True)
    _, counts = torch.unique_consecutive(key_sorted, return_counts=True)
    length = int(counts.max())
    valid = torch.arange(length, device=grid.device)[None, :] < counts[:, None]
    return len(counts), valid, order


def feed_forward(dim: int, hidden: int, dropout: float = 0.0) -> nn.Sequential:
    """Linear → GELU → Dropout → Linear → Dropout (every feed-forward of the reference modules)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout))


class FusionEncoder(nn.Module):
    """Transformer over the concatenated scale tokens (key mask for invalid tiles) → feed-forward."""

    def __init__(self, dim: int = 512, depth: int = 1, heads: int = 1, mlp_dim: int = 1024, dropout: float = 0.1):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, dropout) for _ in range(depth))
        self.ff = feed_forward(dim, 2 * dim, dropout)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, L, E), valid (B, L) bool, weights (L,) or (B, L): backbone tokens each token stands for.

        With weights, log(weight) is added to every attention logit of that key ("proportional attention"
        of token merging), so a pooled grid of k tokens attends like the k x w tokens it replaces.
        """
        bias = masked_bias(valid, tokens.dtype)
        if weights is not None:
            bias = bias + torch.log(weights.to(tokens.dtype)).expand(valid.shape)[:, None, None, :]
        x = tokens
        for block in self.blocks:
            x = block(x, bias)
        return self.ff(x)


class ProjectionHead(nn.Module):
    """BLEEP/CLIP projection: Linear → GELU → Linear → Dropout, residual to the first Linear, LayerNorm."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        return self.norm(projected + self.dropout(self.fc(F.gelu(projected))))
