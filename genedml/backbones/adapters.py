"""State-dict adapters: map a published checkpoint's key layout onto the timm model genedml builds.

A spec names its adapter by string (``state_dict_adapter="transformers-vit"``), so specs stay plain data.
Every adapter is a pure function ``(state, model) -> state``: `model` is the target timm model (built on the
meta device: only its shapes and flags are read) and the result must fit ``model`` (plus ``pool.*`` for an
attentional pooling head) exactly; `load_into` then checks it strictly, so a wrong guess about a checkpoint
fails loudly with the offending keys. The maps are exact reparametrisations (no retraining, no approximation)
except where a docstring says otherwise.
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from genedml.errors import GenedmlError, WeightsMismatchError

StateDict = dict[str, torch.Tensor]
Adapter = Callable[[StateDict, nn.Module], StateDict]
POOL_PREFIX = "pool."  # keys of the attentional pooling head (TimmEncoder.pool)


def adapt_state_dict(name: str, state: StateDict, model: nn.Module) -> StateDict:
    """Apply the adapter called `name` to `state` for the target timm `model`."""
    if name not in ADAPTERS:
        raise GenedmlError(f"unknown state-dict adapter '{name}'; known: {', '.join(ADAPTERS)}.")
    return ADAPTERS[name](dict(state), model)


# --- Hugging Face transformers ViTModel / Dinov2Model / Dinov2WithRegistersModel → timm VisionTransformer -----

# Per-layer renames, covering the layout of checkpoints saved by transformers 4.x (what the published files
# hold) and the in-memory names of transformers 5.x. q/k/v and the SwiGLU halves are merged afterwards.
_LAYER_RENAMES = (
    ("layernorm_before.", "norm1."), ("layernorm_after.", "norm2."), ("norm1.", "norm1."), ("norm2.", "norm2."),
    ("attention.attention.query.", "q."), ("attention.attention.key.", "k."), ("attention.attention.value.", "v."),
    ("attention.q_proj.", "q."), ("attention.k_proj.", "k."), ("attention.v_proj.", "v."),
    ("attention.output.dense.", "attn.proj."), ("attention.o_proj.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."), ("output.dense.", "mlp.fc2."),
    ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2."),
    ("mlp.weights_in.", "mlp.fc1."), ("mlp.weights_out.", "mlp.fc2."),  # SwiGLU, gate first = timm SwiGLUPacked
    ("mlp.gate_proj.", "gate."), ("mlp.up_proj.", "up."), ("mlp.down_proj.", "mlp.fc2."),
    ("layer_scale1.lambda1", "ls1.gamma"), ("layer_scale2.lambda1", "ls2.gamma"),
)
_LAYER_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
_DROPPED = ("embeddings.mask_token", "pooler.")  # MIM token and ViTModel's tanh pooler: unused for features


def transformers_vit(state: StateDict, model: nn.Module) -> StateDict:
    """transformers ViT/DINOv2(-with-registers) keys → timm ViT keys (Phikon, Phikon-v2, Hibou, Midnight).

    q/k/v linears are stacked into timm's fused ``qkv``; layer scales become ``ls*.gamma``; the position
    embedding is resampled to the model's grid when the checkpoint was saved for another image size, with the
    bicubic size-based interpolation transformers applies at run time (so at this input size the features are
    those of transformers, not approximately); for timm's ``no_embed_class`` layout (DINOv2 with registers) the
    class-token position is folded into the class token, which is exactly what transformers adds to it.
    """
    state = {k: v for k, v in state.items() if not k.startswith(_DROPPED)}
    out: StateDict = {}
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            out[_GLOBAL_RENAMES.get(key, key)] = value
            continue
        index, rest = int(match.group(1)), match.group(2)
        for old, new in _LAYER_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        else:
            raise WeightsMismatchError(f"unrecognised transformers layer key '{key}' (not a ViT/DINOv2 checkpoint?).")
        per_layer.setdefault(index, {})[rest] = value
    for index, layer in sorted(per_layer.items()):
        for suffix in ("weight", "bias"):
            parts = [layer.pop(f"{p}.{suffix}", None) for p in ("q", "k", "v")]
            if all(p is not None for p in parts):
                layer[f"attn.qkv.{suffix}"] = torch.cat(parts, 0)
            gate, up = layer.pop(f"gate.{suffix}", None), layer.pop(f"up.{suffix}", None)
            if gate is not None and up is not None:
                layer[f"mlp.fc1.{suffix}"] = torch.cat([gate, up], 0)
        out.update({f"blocks.{index}.{k}": v for k, v in layer.items()})
    if "pos_embed" in out:
        _place_position_embedding(out, model, _resample_size_based)
    return out


_GLOBAL_RENAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


# --- CONCH (MahmoodLab) --------------------------------------------------------------------------------------

def conch_v1(state: StateDict, model: nn.Module) -> StateDict:
    """CONCH v1 CoCa checkpoint → timm ViT-B/16 trunk + contrastive attentional pooler (text tower dropped).

    Kept: ``visual.trunk.*`` (a timm VisionTransformer already), ``visual.attn_pool_contrast.*`` (an
    ``nn.MultiheadAttention`` with separate q/k/v projections because kdim ≠ embed_dim) and
    ``visual.ln_contrast``. Dropped: the text tower, the captioning pooler and ``proj_contrast`` (the
    512×512 projection into the joint image-text space, which CONCH's ``encode_image(proj_contrast=False)``
    — the HEST/TRIDENT patch-feature setting — does not apply).
    """
    trunk = {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    pool = {k[len("visual.attn_pool_contrast."):]: v for k, v in state.items()
            if k.startswith("visual.attn_pool_contrast.")}
    if not trunk or not pool:
        raise WeightsMismatchError(
            "not a CONCH v1 checkpoint: no 'visual.trunk.*' / 'visual.attn_pool_contrast.*' keys.")
    q_bias, k_bias, v_bias = pool["attn.in_proj_bias"].chunk(3)
    out = dict(trunk)
    out.update(_pool_keys(
        query=pool["query"], norm_q=(pool["ln_q.weight"], pool["ln_q.bias"]),
        norm_k=(pool["ln_k.weight"], pool["ln_k.bias"]),
        q=(pool["attn.q_proj_weight"], q_bias), k=(pool["attn.k_proj_weight"], k_bias),
        v=(pool["attn.v_proj_weight"], v_bias), out=(pool["attn.out_proj.weight"], pool["attn.out_proj.bias"]),
        norm=(state["visual.ln_contrast.weight"], state["visual.ln_contrast.bias"]),
    ))
    if "pos_embed" in out:
        _place_position_embedding(out, model, _resample_size_based)
    return out


def conch_v1_5(state: StateDict, model: nn.Module) -> StateDict:
    """CONCH v1.5 vision checkpoint (``pytorch_model_vision.bin``) → timm ViT-L/16 + attentional pooler.

    The trunk's keys are timm's already (an iBOT-derived ViT with LayerScale). Its position embedding is
    stored for a 224-px grid (14 × 14; TRIDENT and CLAM load it strictly into a 224-px trunk) while the model
    runs at 448 px: it is resampled here once with the DINO rule the original trunk applies at every forward
    pass (bicubic with scale factor (28 + 0.1) / 14), so the 448-px features match TRIDENT's. The pooler's
    ``to_kv`` is split into keys and values; none of its linears has a bias.
    """
    trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    pool = {k[len("attn_pool_contrast."):]: v for k, v in state.items() if k.startswith("attn_pool_contrast.")}
    if not trunk or not pool:
        raise WeightsMismatchError("not a CONCH v1.5 checkpoint: no 'trunk.*' / 'attn_pool_contrast.*' keys.")
    k_weight, v_weight = pool["to_kv.weight"].chunk(2)
    out = dict(trunk)
    out.update(_pool_keys(
        query=pool["query"], norm_q=(pool["ln_q.weight"], pool["ln_q.bias"]),
        norm_k=(pool["ln_k.weight"], pool["ln_k.bias"]),
        q=(pool["to_q.weight"], None), k=(k_weight, None), v=(v_weight, None), out=(pool["to_out.weight"], None),
        norm=(state["ln_contrast.weight"], state["ln_contrast.bias"]),
    ))
    if "pos_embed" in out:
        _place_position_embedding(out, model, _resample_dino_offset)
    return out


def _pool_keys(**parts: object) -> StateDict:
    """AttentionalPool parameter names (``pool.*``) from (weight, bias) pairs; a None bias is left out."""
    out: StateDict = {f"{POOL_PREFIX}query": parts.pop("query")}  # type: ignore[dict-item]
    for name, (weight, bias) in parts.items():  # type: ignore[misc]
        out[f"{POOL_PREFIX}{name}.weight"] = weight
        if bias is not None:
            out[f"{POOL_PREFIX}{name}.bias"] = bias
    return out


# --- position embeddings ---------------------------------------------------------------------------------------

def _place_position_embedding(state: StateDict, model: nn.Module,
                              resample: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
    """Fit a checkpoint's [1, 1 + n², D] position embedding (class position first) to `model`'s layout."""
    pos = state["pos_embed"]
    grid = tuple(model.patch_embed.grid_size)
    if grid[0] != grid[1]:
        raise GenedmlError(f"position-embedding adapters assume a square grid, the model has {grid}.")
    side = math.isqrt(pos.shape[1] - 1)
    if side * side != pos.shape[1] - 1:
        raise WeightsMismatchError(f"position embedding of shape {tuple(pos.shape)} is not 1 + n² tokens.")
    class_pos, patch_pos = pos[:, :1], pos[:, 1:]
    if side != grid[0]:
        patch_pos = resample(patch_pos.reshape(1, side, side, -1), grid[0]).reshape(1, grid[0] * grid[1], -1)
    if getattr(model, "no_embed_class", False):
        # timm adds no position to the class token in this layout: add the checkpoint's class position once.
        state["cls_token"] = state["cls_token"] + class_pos
        state["pos_embed"] = patch_pos
    else:
        state["pos_embed"] = torch.cat([class_pos, patch_pos], 1)


def _resample_size_based(grid: torch.Tensor, side: int) -> torch.Tensor:
    """[1, n, n, D] → [1, side, side, D], bicubic to an output size in float32 (transformers' rule)."""
    x = grid.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
    return x.to(grid.dtype).permute(0, 2, 3, 1)


def _resample_dino_offset(grid: torch.Tensor, side: int) -> torch.Tensor:
    """[1, n, n, D] → [1, side, side, D], bicubic with DINO's scale factor (side + 0.1) / n (iBOT/DINO trunks)."""
    n = grid.shape[1]
    x = grid.permute(0, 3, 1, 2).float()
    scale = (side + 0.1) / n
    x = F.interpolate(x, scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if tuple(x.shape[-2:]) != (side, side):
        raise GenedmlError(f"DINO position resampling gave {tuple(x.shape[-2:])}, expected {(side, side)}.")
    return x.to(grid.dtype).permute(0, 2, 3, 1)


ADAPTERS: dict[str, Adapter] = {
    "transformers-vit": transformers_vit,
    "conch-v1": conch_v1,
    "conch-v1.5": conch_v1_5,
}
