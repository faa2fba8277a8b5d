"""Patch preprocessing per spec: uint8 [B, H, W, 3] → normalised float [B, 3, S, S] on the model's device."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from genedml.backbones.registry import BackboneSpec
from genedml.errors import InputError


def as_uint8_batch(batch: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Check and wrap a batch of RGB patches (uint8, [B, H, W, 3]) as a torch tensor (no copy for numpy)."""
    tensor = torch.from_numpy(np.ascontiguousarray(batch)) if isinstance(batch, np.ndarray) else batch
    if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.uint8 or tensor.ndim != 4 \
            or tensor.shape[-1] != 3:
        got = (getattr(tensor, "dtype", type(tensor)), tuple(getattr(tensor, "shape", ())))
        raise InputError(f"patches must be uint8 RGB with shape [B, H, W, 3], got dtype {got[0]} shape {got[1]}.")
    return tensor


def preprocess(
    batch: torch.Tensor | np.ndarray,
    spec: BackboneSpec,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """Resize/crop per the spec, scale to [0, 1], normalise with the spec's mean/std → [B, 3, S, S] float32.

    With ``spec.resize`` the shorter side goes to ``resize`` (bicubic, antialiased, clamped like a uint8
    image) and the centre ``input_size`` square is kept (GigaPath); otherwise a patch of another size is
    resized straight to ``input_size``.
    """
    images = as_uint8_batch(batch).to(device, non_blocking=True)  # move uint8: 4× less to transfer
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    size = spec.input_size
    if spec.resize is not None:
        x = _resize_shorter(x, spec.resize)
        x = _centre_crop(x, size)
    elif x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    # The permuted NHWC input is already channels_last in memory; keep it for CNNs, pack it for ViTs.
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _resize_shorter(x: torch.Tensor, shorter: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    if min(height, width) == shorter:
        return x
    scale = shorter / min(height, width)
    target = (max(shorter, round(height * scale)), max(shorter, round(width * scale)))
    return F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)


def _centre_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    height, width = x.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return x[..., top:top + size, left:left + size]
