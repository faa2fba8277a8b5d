"""`load_backbone`: a frozen, eval-mode encoder with its weights resolved, checked and recorded."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from genedml.backbones.adapters import POOL_PREFIX, adapt_state_dict
from genedml.backbones.registry import BackboneSpec, get_spec
from genedml.backbones.stats import HEStats
from genedml.backbones.timm_encoder import ALL_TOKENS, TimmEncoder
from genedml.backbones.transforms import preprocess
from genedml.backbones.weights import (
    check_no_meta,
    file_sha256,
    find_weights,
    load_into,
    missing_weights_message,
    read_state_dict,
)
from genedml.errors import GenedmlError, MissingWeightsError

RANDOM_INIT = "random-init"
NOT_LEARNED = "not-learned"  # he-stats: deterministic statistics, no weights at all
RANDOM_SEED = 0
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Backbone(nn.Module):
    """A frozen encoder: `encode` maps uint8 RGB patches [B, H, W, 3] to tokens [B, 1 + g², D] (float32).

    Token 0 is the pooled vector per ``spec.pooling``; tokens 1.. are the patch tokens (ViT, CLS/registers
    excluded) or the final CNN feature map, average-pooled to a token_grid × token_grid grid, row-major.
    """

    def __init__(self, spec: BackboneSpec, encoder: nn.Module, weights: str, weights_path: Path | None,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.spec = spec
        self.encoder = encoder
        self.weights = weights
        self.weights_path = weights_path
        self.device = _checked_device(device)
        # CNNs run ~1.7x faster channels_last (measured on CPU too); ViTs and statistics gain nothing.
        self.channels_last = isinstance(encoder, TimmEncoder) and not encoder.is_vit
        self.encoder.to(self.device)
        if self.channels_last:
            self.encoder.to(memory_format=torch.channels_last)
        self.eval()
        self.requires_grad_(False)
        probe = np.zeros((1, spec.input_size, spec.input_size, 3), np.uint8)
        dim = int(self.encode(probe).shape[-1])
        # Patch tokens of the native feature map (196 for a ViT-*/16 at 224 px, 49 for a ResNet's 7 x 7):
        # how many backbone tokens a pooled or gridded cached token stands for. None without a token map.
        self.native_tokens: int | None = None
        if isinstance(encoder, TimmEncoder) and spec.pooling != "attn":
            self.native_tokens = int(self.encode(probe, ALL_TOKENS).shape[1]) - 1
        if dim != spec.dim:
            raise GenedmlError(
                f"backbone '{spec.name}' ({spec.arch}) produces {dim}-d features but its spec registers "
                f"dim={spec.dim}; fix the spec's dim or kwargs."
            )

    @property
    def dim(self) -> int:
        return self.spec.dim

    def preprocess(self, batch_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [B, H, W, 3] → normalised float [B, 3, S, S] on this backbone's device (resize/crop per spec)."""
        return preprocess(batch_uint8, self.spec, self.device, self.channels_last)

    @torch.inference_mode()
    def encode(self, batch_uint8: torch.Tensor | np.ndarray, token_grid: int = 0) -> torch.Tensor:
        """Tokens [B, 1 + token_grid², D] (or [B, 1 + native patch tokens, D] for ALL_TOKENS), float32."""
        if not (isinstance(token_grid, int) and (token_grid >= 0 or token_grid == ALL_TOKENS)):
            raise GenedmlError(f"token_grid must be an integer >= 0 (or ALL_TOKENS), got {token_grid!r}.")
        x = self.preprocess(batch_uint8)
        with self._autocast():
            tokens = self.encoder.tokens(x, token_grid)
        return tokens.float()

    def forward(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """Pooled vectors [B, D] (token 0 of `encode`)."""
        return self.encode(batch_uint8, 0)[:, 0]

    def provenance(self) -> dict[str, Any]:
        """JSON-able record of what produced the features (stored with every feature cache)."""
        import timm

        import genedml

        spec = self.spec
        record = {
            "backbone": spec.name, "arch": spec.arch, "kwargs": dict(spec.kwargs), "kind": spec.kind,
            "weights": self.weights, "weights_path": str(self.weights_path) if self.weights_path else None,
            "mean": list(spec.mean), "std": list(spec.std), "input_size": spec.input_size,
            "resize": spec.resize, "pooling": spec.pooling, "dim": spec.dim, "precision": spec.precision,
            "truncate": spec.truncate, "num_register_tokens": spec.num_register_tokens,
            "pool_kwargs": dict(spec.pool_kwargs) or None, "state_dict_adapter": spec.state_dict_adapter,
            "timm": timm.__version__, "torch": torch.__version__, "genedml": genedml.__version__,
        }
        if self.weights == RANDOM_INIT:
            record["note"] = "random weights: features carry no biology (tests and speed checks only)"
        return record

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = _AUTOCAST.get(self.spec.precision)
        if self.device.type == "cuda" and dtype is not None:
            return torch.autocast(device_type="cuda", dtype=dtype)
        return contextlib.nullcontext()  # CPU/MPS: fp32

    def train(self, mode: bool = True) -> "Backbone":
        # A frozen backbone stays in eval mode (BatchNorm statistics, no dropout) whatever the caller does.
        return super().train(False)


def load_backbone(
    name: str,
    *,
    weights: Path | str | None = None,
    random_init: bool = False,
    device: torch.device | str = "cpu",
    allow_download: bool = False,
) -> Backbone:
    """Build backbone `name` with weights from `weights`, $GENEDML_WEIGHTS_DIR/<name>/ or a warm HF cache.

    ``random_init=True`` uses seeded random weights (identical across loads) and records "random-init";
    weight-free specs (tiny-vit, tiny-cnn) fall back to that when no file is found; he-stats needs none.
    """
    spec = get_spec(name)
    if spec.unavailable_reason:
        raise GenedmlError(
            f"backbone '{name}' is listed for comparison but genedml cannot build it: {spec.unavailable_reason} "
            "See docs/backbones.md for the encoders it can build."
        )
    if random_init and weights is not None:
        raise GenedmlError(f"backbone '{name}': choose either --weights or --random-init, not both.")
    if spec.kind == "stats":
        if weights is not None:
            raise GenedmlError(f"backbone '{name}' computes colour/texture statistics and takes no weights.")
        return Backbone(spec, HEStats(), NOT_LEARNED, None, device)
    source = None if random_init else find_weights(spec, weights, allow_download)
    if source is None:
        if not (random_init or spec.random_init_only):
            raise MissingWeightsError(missing_weights_message(spec))
        return Backbone(spec, random_encoder(spec), RANDOM_INIT, None, device)
    encoder = _encoder_from_file(spec, source.path)
    return Backbone(spec, encoder, f"sha256:{file_sha256(source.path)}", source.path, device)


def random_encoder(spec: BackboneSpec) -> TimmEncoder:
    """The architecture with seeded random weights; the global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return TimmEncoder(spec)


def _encoder_from_file(spec: BackboneSpec, path: Path) -> TimmEncoder:
    """Build on the meta device and assign the file's tensors (no wasted random init of a 1B-param model)."""
    state = read_state_dict(path)
    with torch.device("meta"):
        encoder = TimmEncoder(spec)
    if spec.state_dict_adapter:
        state = adapt_state_dict(spec.state_dict_adapter, state, encoder.model)
    _load_encoder(encoder, state, spec, path, assign=True)
    if not check_no_meta(encoder):
        # Some module keeps non-persistent buffers that no file holds: build for real and copy instead.
        encoder = random_encoder(spec)
        _load_encoder(encoder, state, spec, path, assign=False)
    return encoder.float()  # checkpoints may be fp16/bf16; autocast decides the compute precision


def _load_encoder(encoder: TimmEncoder, state: dict[str, torch.Tensor], spec: BackboneSpec, path: Path,
                  assign: bool) -> None:
    """Strictly load the trunk (and, for pooling "attn", the ``pool.*`` keys into the pooling head)."""
    if encoder.pool is not None:
        pool = {k[len(POOL_PREFIX):]: v for k, v in state.items() if k.startswith(POOL_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(POOL_PREFIX)}
        load_into(encoder.pool, pool, (), spec, path, assign=assign)
    load_into(encoder.model, state, encoder.ignored_prefixes, spec, path, assign=assign)


def _checked_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenedmlError(f"device '{device}' requested but CUDA is not available here; use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GenedmlError(f"device '{device}' requested but MPS is not available here; use --device cpu.")
    return device
