"""Export a feature cache to the TRIDENT/HEST `.h5` layout: `features`, `coords`, `barcodes` per sample."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from genedml.cache.store import FeatureCache


def export_h5(cache: FeatureCache, out_dir: str | Path, samples: list[str] | None = None) -> list[Path]:
    """Write one `<sample>.h5` per sample with the pooled local features and top-left level-0 coords."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for sample_id in samples or cache.samples():
        cached = cache.read(sample_id, names=["local", "barcodes", "centers"])
        fov = float(cached.attrs["fov_px"])
        coords = np.floor(cached.arrays["centers"] - fov / 2.0).astype(np.int64)  # top-left corners
        path = out / f"{sample_id}.h5"
        with h5py.File(path, "w") as fh:
            fh.create_dataset("features", data=cached.local[:, 0, :].astype(np.float32))
            ds = fh.create_dataset("coords", data=coords)
            ds.attrs["patch_size_level0"] = int(round(fov))
            ds.attrs["patch_size"] = int(cache.settings.get("patch_px", 224))
            fh.create_dataset("barcodes", data=cached.barcodes.astype("S"))
            fh.attrs["backbone"] = str(cache.settings.get("backbone"))
            fh.attrs["weights"] = str(cache.settings.get("weights"))
        written.append(path)
    return written
