"""Facts for `genedml doctor` and `genedml backbones`: where weights would come from, what the machine has.

Pure functions returning plain data; the CLI prints them. Nothing here loads a model or hashes a file.
"""

from __future__ import annotations

from importlib import metadata
import os
import platform
from typing import Any

from genedml.backbones.registry import list_specs
from genedml.backbones.weights import WEIGHTS_ENV, find_weights, hf_cache_dir, weights_dir
from genedml.errors import GenedmlError


def backbone_rows() -> list[dict[str, Any]]:
    """One row per registered backbone: name, arch, dim, pooling, and where its weights were found."""
    rows = []
    for spec in list_specs():
        if spec.unavailable_reason:
            found, where = False, f"cannot be built: {spec.unavailable_reason}"
        elif spec.kind == "stats":
            found, where = True, "no weights needed (statistics)"
        else:
            try:
                source = find_weights(spec)
            except GenedmlError as err:  # e.g. a weights folder with two candidate files: show why
                source, where = None, f"error: {err}"
            else:
                where = f"{source.origin}: {source.path}" if source else None
            found = source is not None
            if not found and where is None:
                where = "random-init only" if spec.random_init_only else "missing"
        rows.append({
            "name": spec.name, "arch": spec.arch, "dim": spec.dim, "pooling": spec.pooling, "kind": spec.kind,
            "weights_found": found, "weights": where, "hub_id": spec.hub_id, "description": spec.description,
            "buildable": spec.unavailable_reason is None, "unavailable_reason": spec.unavailable_reason,
        })
    return rows


def environment_report() -> dict[str, Any]:
    """Python/torch/CUDA/devices, library versions, faiss build and GPU count, weights and HF settings."""
    import torch

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "mps_available": bool(torch.backends.mps.is_available()),
        "cpu_threads": torch.get_num_threads(),
    }
    for package in ("timm", "zarr", "anndata", "safetensors", "huggingface_hub"):
        report[package] = _version(package)
    report["faiss"], report["faiss_gpus"] = _faiss()
    root = weights_dir()
    report[WEIGHTS_ENV] = str(root) if root else None
    report["weights_dir_exists"] = bool(root and root.is_dir())
    report["HF_HUB_OFFLINE"] = os.environ.get("HF_HUB_OFFLINE")
    report["hf_cache"] = str(hf_cache_dir()) if hf_cache_dir() else None
    return report


def _version(distribution: str) -> str | None:
    """Installed version from package metadata (no import: some packages warn on `__version__`)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _faiss() -> tuple[str | None, int]:
    try:
        import faiss
    except ImportError:
        return None, 0
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return str(getattr(faiss, "__version__", "unknown")), int(gpus)
