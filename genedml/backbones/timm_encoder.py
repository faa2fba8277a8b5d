"""Build a timm architecture from a spec (never downloading) and turn its features into pooled + grid tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from genedml.backbones.attn_pool import AttentionalPool
from genedml.backbones.registry import BackboneSpec
from genedml.backbones.token_cells import cell_membership, pool_cells
from genedml.errors import GenedmlError


ALL_TOKENS = -1  # token_grid value that keeps every patch token instead of a pooled grid


def timm_kwargs(spec: BackboneSpec) -> dict[str, Any]:
    """The spec's kwargs for timm.create_model: `*_layer` strings naming timm.layers classes become classes."""
    import timm.layers

    kwargs: dict[str, Any] = {}
    for key, value in spec.kwargs.items():
        if key.endswith("_layer") and isinstance(value, str) and hasattr(timm.layers, value):
            value = getattr(timm.layers, value)
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return kwargs


class TimmEncoder(nn.Module):
    """A timm model without classifier; `tokens` pools its features per the spec's pooling rule.

    With pooling "attn" the encoder also owns `pool`, an attentional pooling head (CONCH) whose checkpoint
    keys are ``pool.*``; every other spec has ``pool = None``.
    """

    def __init__(self, spec: BackboneSpec) -> None:
        super().__init__()
        import timm

        self.spec = spec
        # pretrained=False: weights are always loaded explicitly by genedml, never fetched by timm.
        self.model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **timm_kwargs(spec))
        self.dropped: tuple[str, ...] = ()
        if spec.truncate:
            self.dropped = _truncate(self.model, spec)
        classifier = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier")
        # Checkpoint keys of removed parts (classifier head, truncated stages) are ignored when loading.
        heads = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
        self.ignored_prefixes = tuple(f"{name}." for name in (*self.dropped, *heads))
        self.is_vit = hasattr(self.model, "num_prefix_tokens")
        if self.is_vit:
            registers = int(self.model.num_prefix_tokens) - int(getattr(self.model, "cls_token", None) is not None)
            if registers != spec.num_register_tokens:
                raise GenedmlError(
                    f"backbone '{spec.name}': {spec.arch} with {dict(spec.kwargs)} has {registers} register "
                    f"tokens but the spec says num_register_tokens={spec.num_register_tokens}."
                )
        if spec.pooling in ("cls", "cls+mean") and not (self.is_vit and self.model.cls_token is not None):
            raise GenedmlError(
                f"backbone '{spec.name}': pooling '{spec.pooling}' needs a ViT with a CLS token; "
                f"{spec.arch} has none (use pooling 'avg')."
            )
        self.pool: AttentionalPool | None = None
        if spec.pooling == "attn":
            if not self.is_vit:
                raise GenedmlError(f"backbone '{spec.name}': pooling 'attn' needs a ViT trunk, {spec.arch} is not one.")
            self.pool = AttentionalPool(spec.dim, int(self.model.num_features), **dict(spec.pool_kwargs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled vector [B, D] (token 0 of `tokens`)."""
        return self.tokens(x, 0)[:, 0]

    def tokens(self, x: torch.Tensor, token_grid: int) -> torch.Tensor:
        """[B, 1 + token_grid², D]: the pooled vector, then the mean of each cell of a token_grid² grid, row-major.

        token_grid = ALL_TOKENS keeps every patch token (CLS + 196 for a ViT-*/16 at 224 px: the sequence the
        reference Gene-DML model fuses).

        For "cls+mean" (Virchow2) every token keeps the pooled layout: token 0 = CLS ⊕ mean of all patch
        tokens, cell token = CLS ⊕ mean of the patch tokens in that cell, so each cell reads like the pooled
        vector restricted to its area (and their mean ≈ token 0). For "attn" (CONCH) token 0 is the pooler over
        all tokens (CLS included, as CONCH does) and a cell token is the same pooler attending only to the
        patch tokens of that cell.
        """
        features = self.model.forward_features(x)
        cls = None
        if features.ndim == 4:  # CNN: [B, C, h, w]
            feature_map = features
            pooled = features.mean((2, 3))
        else:  # ViT: [B, prefix + N, D]; registers sit between CLS and the patch tokens
            patches = features[:, self.model.num_prefix_tokens:]
            height, width = self.model.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
            feature_map = patches.transpose(1, 2).reshape(patches.shape[0], -1, height, width)
            cls = features[:, 0]
            if self.spec.pooling == "cls":
                pooled = cls
            elif self.spec.pooling == "cls+mean":
                pooled = torch.cat([cls, patches.mean(1)], -1)
            elif self.spec.pooling == "attn":
                pooled = self.pool(features)[:, 0]
                if token_grid == ALL_TOKENS:
                    raise GenedmlError(f"backbone '{self.spec.name}' pools with attention: --local-tokens all is "
                                       "not defined for it; use cls, 2x2 or 4x4")
                if token_grid > 0:
                    cells = self.pool(patches, cell_membership(height, width, token_grid, patches.device))
                    return torch.cat([pooled[:, None], cells], 1)
            else:
                pooled = patches.mean(1)
        if token_grid == 0:
            return pooled[:, None]
        if token_grid == ALL_TOKENS:
            cells = feature_map.flatten(2).transpose(1, 2)
        else:
            cells = pool_cells(feature_map, token_grid)
        if self.spec.pooling == "cls+mean":
            cells = torch.cat([cls[:, None].expand(-1, cells.shape[1], -1), cells], -1)
        return torch.cat([pooled[:, None], cells], 1)


def _truncate(model: nn.Module, spec: BackboneSpec) -> tuple[str, ...]:
    """Replace the stages after `spec.truncate` (e.g. layer4 after layer3) by identities; return their names."""
    stages = [name for name, _ in model.named_children() if name.startswith("layer")]
    if spec.truncate not in stages:
        raise GenedmlError(
            f"backbone '{spec.name}': truncate='{spec.truncate}' is not a stage of {spec.arch} ({stages})."
        )
    dropped = tuple(stages[stages.index(spec.truncate) + 1:])
    for name in dropped:
        setattr(model, name, nn.Identity())
    return dropped
