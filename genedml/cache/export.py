"""Export a feature cache to `.h5` files that HEST's benchmark and TRIDENT read as their own.

One `<sample>.h5` per sample with the pooled local vector of every spot and the top-left level-0 corner of
its patch. Two layouts, named after the reader that consumes them:

- ``trident`` (default; also CLAM and the slide encoders built on them): ``features`` (N, D) with attrs
  ``name``, ``savetodir``, ``encoder``; ``coords`` (N, 2) int64 with attrs ``patch_size``,
  ``patch_size_level0``, ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``,
  ``savetodir``, ``level0_width``, ``level0_height``; plus ``barcodes`` to join back to the spots.
- ``hest`` (HEST-Benchmark's embedding files): ``embeddings`` (N, D), ``barcodes`` (N, 1) bytes,
  ``coords`` (N, 2).

Magnifications follow TRIDENT's own conversion (µm/px = 10 / magnification) and are written exactly, not
rounded to 20x/40x, so ``patch_size · level0_magnification / target_magnification`` is the level-0 patch
side. ``overlap`` is 0: spot patches are placed at spot centres, not on a tiling grid.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np

from genedml.cache.store import FeatureCache
from genedml.errors import ConfigError
from genedml.jsonio import atomic_file
from genedml.typed import check_unique

LAYOUTS = ("trident", "hest")
MICRONS_AT_1X = 10.0  # TRIDENT (WSIPatcher): pixel size in µm = 10 / magnification


def export_h5(cache: FeatureCache, out_dir: str | Path, samples: list[str] | None = None, layout: str = "trident") -> list[Path]:
    """Write one `<sample>.h5` per sample in `layout` (`trident` or `hest`); returns the paths."""
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}.")
    ids = list(samples or cache.samples())
    check_unique("--samples", ids)
    cache.require(ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for sample_id in ids:
        cached = cache.read(sample_id, names=["local", "barcodes", "centers"])
        fov = float(cached.attrs["fov_px"])
        coords = np.floor(cached.arrays["centers"] - fov / 2.0).astype(np.int64)  # top-left corners
        features = np.asarray(cached.local[:, 0, :], dtype=np.float32)
        barcodes = np.char.encode(cached.barcodes.astype(str), "utf-8")  # fixed-length bytes, as HEST's patch files
        path = out / f"{sample_id}.h5"
        with atomic_file(path) as tmp:  # HEST and TRIDENT take every .h5 in the folder: never a partial one
            _write_h5(tmp, layout, features, barcodes, coords, cache, cached, sample_id, out)
        written.append(path)
    return written


def _write_h5(path: Path, layout: str, features: np.ndarray, barcodes: np.ndarray, coords: np.ndarray, cache: FeatureCache, cached: Any,
              sample_id: str, out: Path) -> None:
    """One sample's features in HEST's or TRIDENT's patch-embedding layout."""
    with h5py.File(path, "w") as fh:
        if layout == "hest":
            fh.create_dataset("embeddings", data=features)
            fh.create_dataset("barcodes", data=barcodes.reshape(-1, 1))
            fh.create_dataset("coords", data=coords)
        else:
            ds = fh.create_dataset("features", data=features)
            ds.attrs.update({"name": sample_id, "savetodir": str(out), "encoder": str(cache.settings.get("backbone"))})
            ds = fh.create_dataset("coords", data=coords)
            ds.attrs.update(trident_coords_attrs(cache.settings, cached.attrs, sample_id, str(out)))
            fh.create_dataset("barcodes", data=barcodes)
        fh.attrs.update(_provenance(cache.settings, cached.attrs))


def trident_coords_attrs(settings: dict, attrs: dict, sample_id: str, savetodir: str) -> dict:
    """TRIDENT's `coords` attributes (trident/IO.py `coords_to_h5`) for spot patches of a cached sample."""
    patch_px = int(settings.get("patch_px", 224))
    mpp = float(attrs["mpp"])
    fov = float(attrs["fov_px"])
    target_mpp = fov * mpp / patch_px  # µm per pixel of the patch fed to the backbone
    width, height = (attrs.get("image_size") or [0, 0])[:2]
    return {
        "patch_size": patch_px,
        "patch_size_level0": int(round(fov)),
        "level0_magnification": MICRONS_AT_1X / mpp,
        "target_magnification": MICRONS_AT_1X / target_mpp,
        "overlap": 0,
        "name": sample_id,
        "savetodir": savetodir,
        "level0_width": int(width),
        "level0_height": int(height),
    }


def _provenance(settings: dict, attrs: dict) -> dict:
    """Root attributes: what made the features (never read by HEST or TRIDENT; for people)."""
    weights = str(settings.get("weights"))
    return {
        "backbone": str(settings.get("backbone")),
        "weights": weights,
        "note": "random-init backbone: not a biology result" if weights == "random-init" else "",
        "mpp": float(attrs["mpp"]),
        "patch_um": float(attrs["fov_px"]) * float(attrs["mpp"]),
        "coords": "top-left corner of each spot's patch, level-0 pixels (x = column, y = row)",
    }
