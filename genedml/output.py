"""Prediction outputs: one AnnData (.h5ad) per sample that scanpy and squidpy plot as they are.

`X` = prediction on the model's gene panel, `obs_names` = barcodes, `obsm['spatial']` = spot centres in
level-0 pixels, retrieval neighbours in `obsm`, provenance in `uns['genedml']`, and the Space Ranger-style
`uns['spatial'][sample_id]` that `sc.pl.spatial` / `sq.pl.spatial_scatter` read:

    images        {'hires': ≤ 2000 px RGB, 'lowres': ≤ 600 px RGB} (absent when the image file is gone)
    scalefactors  tissue_hires_scalef, tissue_lowres_scalef (image px per level-0 px), spot_diameter_fullres
    metadata      software_version, source_image_path

Written atomically (a temporary file renamed into place).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

import genedml
from genedml.data.image import RegionReader, thumbnail_step
from genedml.errors import ImageError, ModelDirError
from genedml.jsonio import atomic_file
from genedml.log import log

HIRES_SIDE = 2000  # long side of Space Ranger's tissue_hires_image.png
LOWRES_SIDE = 600  # long side of Space Ranger's tissue_lowres_image.png
READ_BLOCK = 4096  # level-0 pixels per side of one block read for a thumbnail (bounds memory on a WSI)
SPOT_DIAMETER_SOURCE = "half the spot pitch (ST: 100 µm spots at 200 µm; Visium: 55 µm at 100 µm, drawn ≈ 10 % small)"


def thumbnail(image: RegionReader, max_side: int = HIRES_SIDE) -> tuple[np.ndarray, float]:
    """A downsampled RGB view (long side ≤ `max_side`) and its scale (thumbnail px per level-0 px).

    A reader with a `thumbnail(max_side)` method makes it cheaply (a JPEG decoded at reduced scale, a pyramid
    level, OpenSlide's thumbnail); otherwise every `step`-th pixel is read in blocks of at most READ_BLOCK²
    level-0 pixels, so memory stays bounded on a whole-slide image without a pyramid.
    """
    cheap = getattr(image, "thumbnail", None)
    made = cheap(max_side) if callable(cheap) else None
    if made is not None:
        return made
    step = thumbnail_step(image.width, image.height, max_side)
    block = step * max(1, READ_BLOCK // step)  # a multiple of step, so blocks join without a seam
    rows = []
    for y in range(0, image.height, block):
        h = min(block, image.height - y)
        cols = [image.read_region(x, y, min(block, image.width - x), h).pixels[::step, ::step] for x in range(0, image.width, block)]
        rows.append(np.concatenate(cols, axis=1))
    return np.concatenate(rows, axis=0), 1.0 / step


def spot_diameter_px(centers: np.ndarray, fallback: float) -> float:
    """Spot diameter in level-0 px: half the spot pitch (`fallback` for one spot).

    The pitch is the median distance from each spot to its 4 nearest spots: the grid neighbours on a square
    (ST) or hexagonal (Visium) grid. The nearest one alone underestimates it on a jittered ST array (≈ 7 %
    on her2st).
    """
    from scipy.spatial import cKDTree

    centers = np.asarray(centers, dtype=np.float64)
    if len(centers) < 2:
        return float(fallback)
    k = min(5, len(centers))
    dist, _ = cKDTree(centers).query(centers, k=k)
    pitch = float(np.median(dist[:, 1:k]))
    return pitch / 2.0 if pitch > 0 else float(fallback)


@dataclass(frozen=True)
class SpatialView:
    """What `uns['spatial'][sample_id]` is made from: an optional hires view and the spot size.

    `hires_scale` is hires px per level-0 px. `note` says why there is no image, when there is none.
    """

    spot_diameter_px: float
    hires: np.ndarray | None = None
    hires_scale: float = 1.0
    source_image: str = ""
    note: str = ""

    @classmethod
    def from_thumbnail(cls, thumb: np.ndarray, scale: float, spot_diameter_px: float, source_image: str = "") -> "SpatialView":
        """A view from any thumbnail (e.g. the one slide prediction already read), shrunk to ≤ HIRES_SIDE."""
        hires, factor = _shrink(np.asarray(thumb), HIRES_SIDE)
        return cls(spot_diameter_px, hires, scale * factor, source_image)

    @classmethod
    def read(cls, image: RegionReader, spot_diameter_px: float) -> "SpatialView":
        """Read the hires view through the image's region reader (bounded size)."""
        thumb, scale = thumbnail(image, HIRES_SIDE)
        return cls(spot_diameter_px, thumb, scale, str(image.path))

    def uns(self) -> dict[str, Any]:
        """The `uns['spatial'][library_id]` entry, with scanpy's key names (`sc.read_visium`)."""
        scalefactors: dict[str, float] = {"spot_diameter_fullres": float(self.spot_diameter_px)}
        images: dict[str, np.ndarray] = {}
        if self.hires is not None:
            lowres, factor = _shrink(self.hires, LOWRES_SIDE)
            images = {"hires": self.hires, "lowres": lowres}
            scalefactors |= {"tissue_hires_scalef": float(self.hires_scale), "tissue_lowres_scalef": float(self.hires_scale * factor)}
        else:
            # No image: scanpy still reads the scale factors; coordinates stay in level-0 pixels.
            scalefactors |= {"tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 1.0}
        metadata = {"software_version": f"genedml {genedml.__version__}", "source_image_path": self.source_image}
        return {"images": images, "scalefactors": scalefactors, "metadata": metadata}


def _shrink(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """`rgb` resized (area average) so its long side is ≤ max_side, and the factor applied."""
    from PIL import Image

    side = max(rgb.shape[:2])
    if side <= max_side:
        return np.ascontiguousarray(rgb, dtype=np.uint8), 1.0
    factor = max_side / side
    size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
    return np.asarray(Image.fromarray(np.asarray(rgb, dtype=np.uint8)).resize(size, Image.Resampling.BOX)), factor


def cached_sample_view(attrs: Mapping[str, Any], centers: np.ndarray, *, read_image: bool = True) -> SpatialView:
    """The spatial view of a cached sample: its image (path and size recorded at extraction), read lazily.

    Falls back to scale factors only, with the reason in `note`, when the image file is missing, has
    another size than at extraction, or cannot be read.
    """
    from genedml.data.formats import open_image

    diameter = spot_diameter_px(centers, fallback=float(attrs.get("fov_px") or 1.0))
    path = str(attrs.get("image") or "")
    if not read_image:
        return SpatialView(diameter, source_image=path, note="image not read (read_image=False)")
    if not path or not Path(path).is_file():
        return SpatialView(diameter, source_image=path, note=f"image {path or '(none recorded)'} not found at prediction time")
    try:
        image = open_image(path)
    except ImageError as exc:
        return SpatialView(diameter, source_image=path, note=f"image {path} could not be opened: {exc}")
    try:
        expected = attrs.get("image_size")
        if expected is not None and [image.width, image.height] != list(expected):
            return SpatialView(diameter, source_image=path, note=f"image {path} is {image.width}x{image.height}, "
                               f"but the features were extracted from a {expected[0]}x{expected[1]} image")
        return SpatialView.read(image, diameter)
    finally:
        image.release()


def log_view(sample_id: str, view: SpatialView) -> None:
    """Say once per sample when a prediction has no image behind it."""
    if view.hires is None:
        log.warning("%s: uns['spatial'] has scale factors but no image (%s)", sample_id, view.note)


def write_prediction(
    path: Path,
    sample_id: str,
    barcodes: np.ndarray,
    centers: np.ndarray,
    genes: Sequence[str],
    pred: dict[str, Any],
    provenance: dict[str, Any],
    *,
    spatial: SpatialView | None = None,
) -> Path:
    """One AnnData per sample: X = prediction, obs_names = barcodes, obsm['spatial'] = centres, uns['spatial']."""
    import anndata as ad
    import pandas as pd

    path = Path(path)
    obs = pd.DataFrame(index=pd.Index(np.asarray(barcodes).astype(str), name="barcode"))
    obs["sample_id"] = sample_id
    if "group" in pred:
        obs["genedml_group"] = group_categorical(pred["group"], pred.get("n_groups"))
    adata = ad.AnnData(X=np.asarray(pred["X"], dtype=np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), name="gene")))
    adata.obsm["spatial"] = np.asarray(centers, dtype=np.float64)
    if "knn_index" in pred:
        adata.obsm["knn_index"] = np.asarray(pred["knn_index"], dtype=np.int64)
        adata.obsm["knn_similarity"] = np.asarray(pred["knn_similarity"], dtype=np.float32)
    if spatial is None:
        spatial = SpatialView(spot_diameter_px(centers, fallback=1.0), note="no image given to write_prediction")
    adata.uns["spatial"] = {sample_id: spatial.uns()}
    provenance = dict(provenance)
    if provenance.get("model_dir"):
        # Relative to the output file, so knn_index (rows of the model's bank) resolves after the folders move.
        provenance["model_dir_relative"] = os.path.relpath(Path(provenance["model_dir"]).resolve(), path.parent.resolve())
    provenance["spatial_image"] = "hires/lowres thumbnails of " + spatial.source_image if spatial.hires is not None else (
        f"no image in uns['spatial'] ({spatial.note}); plot with sc.pl.spatial(adata, img_key=None)")
    provenance["spot_diameter"] = SPOT_DIAMETER_SOURCE
    adata.uns["genedml"] = _h5_safe(provenance | {"sample_id": sample_id})
    # A cut-off write must leave nothing `genedml evaluate FOLDER` would take as a prediction.
    with atomic_file(path) as tmp:
        adata.write_h5ad(tmp)
    return path


def group_categorical(groups: np.ndarray, n_groups: int | None = None) -> Any:
    """Prototype indices as an ordered categorical whose categories run 0, 1, 2, … (numeric, not string order).

    All `n_groups` prototypes are categories even when a sample uses only some, so colours agree across samples.
    """
    import pandas as pd

    groups = np.asarray(groups).astype(np.int64)
    n = int(n_groups) if n_groups else int(groups.max(initial=-1)) + 1
    return pd.Categorical.from_codes(groups, categories=[str(i) for i in range(n)], ordered=True)


def model_dir_of(prediction: str | Path, genedml_uns: Mapping[str, Any]) -> Path:
    """The model directory of a prediction file: relative to the file first (folders moved), else absolute."""
    prediction = Path(prediction)
    tried = []
    relative = genedml_uns.get("model_dir_relative")
    if relative:
        candidate = prediction.parent / str(relative)
        tried.append(str(candidate))
        if candidate.is_dir():
            return candidate
    absolute = genedml_uns.get("model_dir")
    if absolute:
        tried.append(str(absolute))
        if Path(str(absolute)).is_dir():
            return Path(str(absolute))
    raise ModelDirError(
        f"The model directory of {prediction} was not found (looked at {tried or 'nothing recorded'}). "
        "Pass it with --model MODEL_DIR."
    )


def _h5_safe(value: Any) -> Any:
    """anndata's uns writer rejects None: drop None entries, recurse into dicts."""
    if isinstance(value, dict):
        return {k: _h5_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_h5_safe(v) for v in value if v is not None]
    return value
