"""Where a backbone's weights come from, how they are read (no pickle), checked against the model and hashed.

Resolution order: an explicit file or folder > ``$GENEDML_WEIGHTS_DIR/<name>/`` > a warm Hugging Face cache
for ``spec.hub_id`` (read locally, as with HF_HUB_OFFLINE=1) > a download only when explicitly allowed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from genedml.backbones.registry import BackboneSpec
from genedml.errors import InputError, MissingWeightsError, WeightsMismatchError

WEIGHTS_ENV = "GENEDML_WEIGHTS_DIR"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".torch")  # .torch: Lunit's release files
HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")  # what timm / HF repos of these models hold
STRIPPED_PREFIXES = ("module.", "model.", "backbone.")
NESTED_KEYS = ("state_dict", "model", "teacher")
MAX_LISTED = 10


@dataclass(frozen=True)
class WeightsSource:
    """A resolved weights file and how it was found."""

    path: Path
    origin: Literal["explicit", "weights-dir", "hf-cache", "download"]


def weights_dir() -> Path | None:
    """$GENEDML_WEIGHTS_DIR, when set."""
    value = os.environ.get(WEIGHTS_ENV)
    return Path(value).expanduser() if value else None


def find_weights(
    spec: BackboneSpec, weights: Path | str | None = None, allow_download: bool = False
) -> WeightsSource | None:
    """The weights file for `spec` by the resolution order, or None when none is found anywhere."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise MissingWeightsError(f"weights for backbone '{spec.name}' not found: {path} does not exist.")
        return WeightsSource(weights_in_folder(path, hub_filenames(spec)) if path.is_dir() else _checked_file(path),
                             "explicit")
    root = weights_dir()
    if root is not None and (root / spec.weights_dirname).is_dir():
        return WeightsSource(weights_in_folder(root / spec.weights_dirname, hub_filenames(spec)), "weights-dir")
    if spec.hub_id:
        cached = hf_cached_file(spec.hub_id, hub_filenames(spec))
        if cached is not None:
            return WeightsSource(cached, "hf-cache")
        if allow_download:
            return WeightsSource(_download(spec), "download")
    return None


def hub_filenames(spec: BackboneSpec) -> tuple[str, ...]:
    """The weights file names looked for in the spec's hub repository (its own name first, when it has one)."""
    return (spec.hub_filename, *HUB_FILENAMES) if spec.hub_filename else HUB_FILENAMES


def weights_in_folder(folder: Path, preferred_names: tuple[str, ...] = HUB_FILENAMES) -> Path:
    """The one weights file of a folder (the hub's file names preferred when there are several)."""
    for preferred in preferred_names:
        if (folder / preferred).is_file():
            return folder / preferred
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(candidates) == 1:
        return candidates[0]
    found = ", ".join(p.name for p in candidates) or "none"
    raise MissingWeightsError(
        f"{folder} must hold exactly one weights file ({'/'.join(WEIGHT_SUFFIXES)}) or "
        f"{' / '.join(HUB_FILENAMES)}; found: {found}. Pass the file itself with --weights."
    )


def hf_cache_dir() -> Path | None:
    """The Hugging Face hub cache in use (HF_HUB_CACHE, else HF_HOME/hub, else the library default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    try:
        from huggingface_hub import constants
    except ImportError:
        return None
    return Path(constants.HF_HUB_CACHE)


def hf_cached_file(hub_id: str, filenames: tuple[str, ...] = HUB_FILENAMES) -> Path | None:
    """A weights file of `hub_id` already in the local HF cache; never touches the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cache = hf_cache_dir()
    for filename in filenames:
        found = try_to_load_from_cache(hub_id, filename, cache_dir=cache)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def missing_weights_message(spec: BackboneSpec) -> str:
    """The actionable message for a backbone whose weights are nowhere to be found."""
    root = weights_dir()
    folder = root / spec.weights_dirname if root else f"$GENEDML_WEIGHTS_DIR/{spec.weights_dirname}/ (unset)"
    hub = (f", or warm the Hugging Face cache for '{spec.hub_id}' (e.g. `huggingface-cli download "
           f"{spec.hub_id}` on a machine with internet; searched {hf_cache_dir()})") if spec.hub_id else ""
    return (
        f"No weights for backbone '{spec.name}' ({spec.arch}). Put the weights file "
        f"({' or '.join(hub_filenames(spec))}) in {folder}, or pass --weights PATH (a file or a folder){hub}. "
        f"Use --random-init only for tests and speed checks (random features carry no biology). "
        f"`genedml doctor` shows where each backbone's weights are looked for."
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors / .bin / .pth / .pt file (no pickle: torch.load with weights_only)."""
    from safetensors.torch import load_file

    kind = sniff_weights_format(path)
    if kind is None:
        raise InputError(
            f"cannot read weights file {path}: it is neither a safetensors file nor a PyTorch checkpoint "
            f"(torch.save zip or pickle){_looks_like(path)}. Accepted: .safetensors, or .bin/.pth/.pt/.torch "
            "written by torch.save (state dict of tensors)."
        )
    try:
        if kind == "safetensors":
            loaded = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — torch/safetensors raise many types (UnpicklingError, RuntimeError, KeyError...) on bad files
        raise InputError(f"cannot read weights file {path} ({kind}): {torch_error_summary(err)}") from None
    return strip_prefixes(_unwrap(loaded, path))


def sniff_weights_format(path: Path) -> str | None:
    """"safetensors", "torch-zip", "torch-pickle" from the first bytes of `path`, or None for anything else."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as err:
        raise InputError(f"cannot read weights file {path}: {err.strerror or err}") from None
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-pickle"  # the legacy torch.save format starts with a pickled magic number
    if len(head) >= 9:
        header_len = int.from_bytes(head[:8], "little")
        if 2 <= header_len <= 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return None


def _looks_like(path: Path) -> str:
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return ""
    if not head:
        return "; the file is empty"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return "; it looks like a text file"


# torch's messages for refused pickles advise re-running with weights_only=False: that executes arbitrary code
# from the file, so it is never advice genedml passes on.
_UNSAFE_ADVICE = ("weights_only", "Weights only load failed", "arbitrary code", "trusted source", "file an issue",
                  "Check the documentation of torch.load", "torch.serialization", "pytorch.org")


def torch_error_summary(err: BaseException) -> str:
    """The informative part of a torch.load / safetensors error, without torch's unsafe advice."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    kept = [line for line in lines if not any(marker in line for marker in _UNSAFE_ADVICE)]
    text = " ".join(kept)[:300] or type(err).__name__
    if "Unsupported global" in str(err) or "WeightsUnpickler" in str(err):
        text += (" — the checkpoint holds Python objects besides tensors; genedml reads tensors only. Convert it "
                 "to .safetensors (or save only the state dict) on a machine where you trust the file")
    return text


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes ("module.", "model.", "backbone.") shared by every key, repeatedly."""
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if all(key.startswith(prefix) for key in state):
                state = {key[len(prefix):]: value for key, value in state.items()}
                changed = True
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], ignored_prefixes: tuple[str, ...],
              spec: BackboneSpec, path: Path, assign: bool = False) -> None:
    """Strictly load `state` into `model`; any missing/unexpected/misshapen key raises WeightsMismatchError."""
    state = {k: v for k, v in state.items() if not k.startswith(ignored_prefixes)} if ignored_prefixes else state
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                 if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or misshapen:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:MAX_LISTED])}{' ...' if len(keys) > MAX_LISTED else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches (file vs model)", misshapen)) if keys]
        raise WeightsMismatchError(
            f"weights file {path} does not fit backbone '{spec.name}' ({spec.arch}, {dict(spec.kwargs)}): "
            + "; ".join(parts) + ". Is it the file for this backbone?"
        )
    model.load_state_dict(state, strict=True, assign=assign)


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks; cached per (path, size, mtime) within the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _checked_file(path: Path) -> Path:
    if path.suffix not in WEIGHT_SUFFIXES:
        raise InputError(f"weights file {path} must end with one of {', '.join(WEIGHT_SUFFIXES)}.")
    return path


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The tensor mapping of a checkpoint, looking one level into {"state_dict" | "model" | "teacher": ...}."""
    if isinstance(loaded, dict) and not any(isinstance(v, torch.Tensor) for v in loaded.values()):
        for key in NESTED_KEYS:
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict):
        raise InputError(f"weights file {path} holds a {type(loaded).__name__}, not a state dict of tensors.")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise InputError(f"weights file {path} holds no tensors (keys: {list(loaded)[:MAX_LISTED]}).")
    return tensors


def _download(spec: BackboneSpec) -> Path:
    """Fetch the weights file of `spec.hub_id` (only with allow_download=True; gated repos need HF_TOKEN)."""
    from huggingface_hub import hf_hub_download

    errors = []
    for filename in hub_filenames(spec):
        try:
            return Path(hf_hub_download(spec.hub_id, filename, cache_dir=hf_cache_dir()))
        except Exception as err:  # network, auth, offline mode, missing file: all reported together below
            errors.append(f"{filename}: {type(err).__name__}: {err}")
    raise MissingWeightsError(
        f"could not download weights of backbone '{spec.name}' from '{spec.hub_id}' "
        f"({'; '.join(errors)}). HF_HUB_OFFLINE=1 forbids downloads; gated models need HF_TOKEN.\n"
        + missing_weights_message(spec)
    )


def check_no_meta(module: nn.Module) -> bool:
    """True when every parameter and buffer is materialised (not left on the meta device)."""
    return not any(t.is_meta for t in (*module.parameters(), *module.buffers()))

