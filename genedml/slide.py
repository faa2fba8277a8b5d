"""Prediction on a slide without sequencing: tissue detection, virtual spots, extraction, maps."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Sequence

import numpy as np

from genedml.data.formats import open_image
from genedml.data.image import RegionReader
from genedml.data.sample import Sample
from genedml.errors import ConfigError, InputError
from genedml.output import SpatialView, spot_diameter_px, thumbnail, write_prediction
from genedml.predict import Predictor, RetrievalSettings
from genedml.log import log

THUMBNAIL_SIDE = 2048


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of values in [0, 1] (256 bins)."""
    hist, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    p = hist.astype(float) / max(1, hist.sum())
    w0 = np.cumsum(p)
    mu = np.cumsum(p * edges[:-1])
    between = (mu[-1] * w0 - mu) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(edges[int(np.argmax(between))])


TISSUE_SATURATION = 0.15  # smoothed saturation of stained tissue is above this; glass/background ≈ 0.06–0.09


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue = smoothed HSV saturation above Otsu's threshold, capped at TISSUE_SATURATION.

    Smoothing (a box filter of 1 % of the thumbnail side) removes JPEG noise and the nuclei/stroma contrast
    inside tissue, so Otsu separates tissue from glass. On a crop that is all tissue Otsu would still split
    it in two, hence the cap, which every H&E stain exceeds (checked on the her2st sections: background
    0.06–0.09, tissue 0.15–0.45).
    """
    from scipy import ndimage

    x = rgb.astype(np.float32) / 255.0
    mx, mn = x.max(axis=2), x.min(axis=2)
    saturation = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    smoothed = ndimage.uniform_filter(saturation, size=max(3, min(saturation.shape) // 100))
    return smoothed > min(otsu_threshold(smoothed), TISSUE_SATURATION)


def virtual_spots(
    image: RegionReader, mpp: float, pitch_um: float, min_tissue: float = 0.5, view: tuple[np.ndarray, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Centres (level-0 px) of a square grid at `pitch_um` over tissue, and their (col, row) grid positions.

    `view` is a `thumbnail(image)` the caller already has (reading one means reading the whole slide).
    """
    thumb, scale = view if view is not None else thumbnail(image, THUMBNAIL_SIDE)
    mask = tissue_mask(thumb)
    pitch_px = pitch_um / mpp
    xs = np.arange(pitch_px / 2, image.width, pitch_px)
    ys = np.arange(pitch_px / 2, image.height, pitch_px)
    gx, gy = np.meshgrid(np.arange(len(xs)), np.arange(len(ys)))
    centers = np.stack([xs[gx.ravel()], ys[gy.ravel()]], axis=1)
    # Fraction of tissue in the spot's cell of the thumbnail grid.
    half = max(1, int(round(pitch_px * scale / 2)))
    cx = np.clip((centers[:, 0] * scale).astype(int), 0, mask.shape[1] - 1)
    cy = np.clip((centers[:, 1] * scale).astype(int), 0, mask.shape[0] - 1)
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    x0, x1 = np.clip(cx - half, 0, mask.shape[1]), np.clip(cx + half, 0, mask.shape[1])
    y0, y1 = np.clip(cy - half, 0, mask.shape[0]), np.clip(cy + half, 0, mask.shape[0])
    area = np.maximum(1, (x1 - x0) * (y1 - y0))
    tissue = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
    keep = tissue >= min_tissue
    if not keep.any():
        raise InputError(f"No tissue found on {image.path} (Otsu on saturation); is it an H&E slide?")
    grid = np.stack([gx.ravel(), gy.ravel()], axis=1)[keep]
    return centers[keep], grid


def predict_slide(
    predictor: Predictor,
    slide: str | Path,
    out: str | Path,
    *,
    mpp: float | None,
    pitch_um: float | None = None,
    genes: Sequence[str] | None = None,
    retrieval: RetrievalSettings | None = None,
    weights: Path | None = None,
    device: str = "auto",
    allow_unusual_mpp: bool = False,
) -> list[Path]:
    """Detect tissue, tile virtual spots, extract with the model's backbone settings, predict, map genes.

    Everything the user chose (mpp, pitch, genes) is checked before the slide is read.
    """
    from genedml.backbones import load_backbone
    from genedml.spots import load_spot_features
    from genedml.cache.store import FeatureCache
    from genedml.extract.geometry import check_mpp, check_patch_geometry
    from genedml.extract.runner import ExtractSettings, run_extraction
    from genedml.plots import expression_map

    if mpp is None:
        raise InputError(f"--mpp (µm per pixel of {slide}) is required for a slide without metadata, e.g. --mpp 0.5.")
    check_mpp(mpp, str(slide), allow_unusual=allow_unusual_mpp)
    if pitch_um is not None and not pitch_um > 0:
        raise ConfigError(f"--pitch-um must be > 0 µm, got {pitch_um}.")
    wanted = list(genes or predictor.targets.heg[:6] or predictor.genes[:6])
    unknown = [g for g in wanted if g not in predictor.genes]
    if unknown:
        close = {g: difflib.get_close_matches(g, predictor.genes, n=1) for g in unknown}
        hint = "; ".join(f"{g} → did you mean {c[0]}?" for g, c in close.items() if c)
        raise InputError(f"Genes {unknown} are not in the model's panel ({len(predictor.genes)} genes, listed in "
                         f"{predictor.model_dir / 'config.json'}){'; ' + hint if hint else ''}.")
    image = open_image(slide)
    cs = predictor.config["cache_settings"]
    settings = ExtractSettings(
        patch_px=int(cs["patch_px"]), mpp_target=cs.get("mpp_target"), scales=tuple(cs["scales"]),
        neighbor_mode=cs.get("neighbor_mode") or "lattice", local_tokens=cs["local_tokens"], augment=None,
        dtype=cs["dtype"], device=device,
    )
    sample_id = Path(slide).stem
    check_patch_geometry(sample_id, mpp, image.width, image.height, settings.geometry, allow_unusual=allow_unusual_mpp)
    pitch = pitch_um or float(predictor.config.get("spot_pitch_um") or 100.0)
    thumb, scale = thumbnail(image, THUMBNAIL_SIDE)
    centers, grid = virtual_spots(image, mpp, pitch, view=(thumb, scale))
    barcodes = np.array([f"{c}x{r}" for c, r in grid])
    sample = Sample(sample_id, sample_id, mpp, barcodes, centers, image, array_coords=grid, source="slide")
    log.info("%s: %d virtual spots at %.1f µm pitch over detected tissue", sample_id, len(centers), pitch)

    from genedml.devices import resolve_device

    random_init = cs.get("weights") == "random-init"
    backbone = load_backbone(cs["backbone"], weights=weights, random_init=random_init, device=str(resolve_device(device)))
    out = Path(out)
    cache = FeatureCache(out / "features", settings.cache_settings(backbone.provenance()))
    predictor.check_cache(cache)  # refuses other weights (hash) than the model was trained with
    run_extraction([sample], backbone, cache.root, settings, overwrite=True)
    feats = load_spot_features(cache, [sample_id], with_aug=False)
    pred = predictor.predict(feats, retrieval)
    spatial = SpatialView.from_thumbnail(thumb, scale, spot_diameter_px(centers, pitch / mpp), str(slide))
    paths = [write_prediction(out / f"{sample_id}.h5ad", sample_id, feats.barcodes, centers, predictor.genes, pred, predictor.provenance(retrieval), spatial=spatial)]
    note = predictor.provenance(retrieval)["note"] or None
    for gene in wanted:
        values = pred["X"][:, predictor.genes.index(gene)]
        paths.append(expression_map(centers, values, out / f"{sample_id}_{gene}.png", gene, image_thumbnail=thumb, scale=scale, note=note))
    return paths
