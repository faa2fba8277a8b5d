"""Attentional pooling head (CoCa-style, as in CONCH): one learned query attends over the trunk's tokens.

pooled = LayerNorm(W_o · MHA(q = W_q · LN(query), k = W_k · LN(tokens), v = W_v · LN(tokens)))

CONCH v1 (open_clip ``nn.MultiheadAttention``, with biases) and CONCH v1.5 (einsum pooler, no biases) compute
exactly this with different parameter layouts; `adapters.py` maps both onto this module's names. A key mask
restricts the attention to a subset of tokens, which is how a token-grid cell gets "the pooled vector of its
own area" (see `TimmEncoder.tokens`).
"""

from __future__ import annotations

import torch
from torch import nn

LAYER_NORM_EPS = 1e-5  # torch's default, used by both CONCH poolers and by CONCH's ln_contrast


class AttentionalPool(nn.Module):
    """Single-query multi-head attention pooling over tokens, followed by a LayerNorm."""

    def __init__(self, dim: int, context_dim: int, heads: int, bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"pooler dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.query = nn.Parameter(torch.zeros(1, dim))
        self.norm_q = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.norm_k = nn.LayerNorm(context_dim, eps=LAYER_NORM_EPS)
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(context_dim, dim, bias=bias)
        self.v = nn.Linear(context_dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        nn.init.normal_(self.query, std=0.02)

    def forward(self, tokens: torch.Tensor, groups: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, N, C] → [B, G, dim]: one pooled vector per group (groups [G, N] bool; None = all tokens)."""
        batch, count, _ = tokens.shape
        head_dim = self.q.out_features // self.heads
        context = self.norm_k(tokens)
        keys = self.k(context).view(batch, count, self.heads, head_dim)
        values = self.v(context).view(batch, count, self.heads, head_dim)
        query = self.q(self.norm_q(self.query)).view(self.heads, head_dim) * head_dim ** -0.5
        logits = torch.einsum("bnhd,hd->bhn", keys, query)[:, :, None, :]  # [B, heads, 1, N]
        if groups is not None:
            logits = logits.masked_fill(~groups[None, None], float("-inf"))  # [B, heads, G, N]
        weights = logits.softmax(-1)
        pooled = torch.einsum("bhgn,bnhd->bghd", weights, values).flatten(2)
        return self.norm(self.out(pooled))
