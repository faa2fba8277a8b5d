"""Device names: checked without torch before any work starts, resolved to a `torch.device` when work starts."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from genedml.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device(device: object, flag: str = "--device") -> str:
    """`device` if it names a device genedml can run on; otherwise a ConfigError naming `flag`."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise ConfigError(f"{flag} must be {DEVICE_CHOICES}, got {device!r}.")
    return device


def resolve_device(device: str, flag: str = "--device") -> torch.device:
    """The torch device for `device` ("auto": CUDA when torch sees one, else the CPU); absent hardware is an error."""
    import torch

    check_device(device, flag)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"{flag} {device} was asked for but torch sees no CUDA device (try {flag} cpu).")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise InputError(f"{flag} {device}: torch sees {torch.cuda.device_count()} CUDA device(s), numbered from 0.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"{flag} mps was asked for but torch sees no MPS device (try {flag} cpu).")
    return torch.device(device)
