"""Synthetic tissue: H&E-like cell texture whose local cell-type composition drives spot expression.

A few cell types (differing in nucleus size, cell size, density and colour) vary smoothly in space. Each
spot's counts are drawn (negative binomial) from rates that are a known linear function of the cell-type
composition around the spot, so expression is learnable from the image. Gene programs depend only on
``program_seed``, so samples made with different tissue ``seed`` share one panel and one biology.
Ground truth (noiseless rates, type fractions, programs) is kept in ``sample.meta``.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy import ndimage

from genedml.data.image import ArrayImage
from genedml.data.sample import Sample

STROMA_RGB = np.array([236.0, 172.0, 205.0], dtype=np.float32)  # eosin-pink background
FIELD_SPACING_UM = 180.0  # correlation length of the cell-type fields
FIELD_SHARPNESS = 2.5  # softmax inverse temperature: higher = more distinct tissue regions
SPOT_DIAMETER_FRACTION = 0.55  # spot diameter / pitch (Visium: 55 µm spots on a 100 µm pitch)
MARGIN_PITCHES = 1.5  # image border around the spot grid, in pitches
N_EDGE_GENES = 4  # 2 all-zero genes, 1 constant-count gene, 1 rarely detected gene


@dataclass(frozen=True)
class CellType:
    """One cell type's look: radii in µm, density in cells per µm², RGB colours."""

    name: str
    nucleus_um: float
    cell_um: float
    density: float
    nucleus_rgb: tuple[float, float, float]
    cytoplasm_rgb: tuple[float, float, float] | None
    elongation: float = 1.0


CELL_TYPES: tuple[CellType, ...] = (
    CellType("tumour", 4.5, 8.0, 1 / 120, (105, 55, 150), (205, 140, 195)),
    CellType("lymphocyte", 2.8, 3.6, 1 / 45, (50, 25, 95), None),
    CellType("fibroblast", 2.2, 2.2, 1 / 350, (90, 45, 130), None, elongation=3.0),
    CellType("adipocyte", 2.0, 22.0, 1 / 1600, (95, 55, 140), (248, 244, 248)),
)


def _disc_offsets(radius_px: float, elongation: float, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel offsets (dy, dx) of a filled ellipse with semi-axes (r·e, r/e^0.5) rotated by ``angle``."""
    a, b = radius_px * np.sqrt(elongation), radius_px / np.sqrt(elongation)
    reach = int(np.ceil(max(a, b, 0.5)))
    dy, dx = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    inside = (u / max(a, 0.5)) ** 2 + (v / max(b, 0.5)) ** 2 <= 1.0
    return dy[inside], dx[inside]


def _stamp(img: np.ndarray, rows: np.ndarray, cols: np.ndarray, offsets, colours: np.ndarray) -> None:
    """Paint one shape (given by offsets) at many centres at once, each in its own colour."""
    dy, dx = offsets
    r = rows[:, None] + dy[None, :]
    c = cols[:, None] + dx[None, :]
    ok = (r >= 0) & (r < img.shape[0]) & (c >= 0) & (c < img.shape[1])
    cell = np.broadcast_to(np.arange(len(rows))[:, None], r.shape)
    img[r[ok], c[ok]] = colours[cell[ok]]


def _stamp_cells(
    img: np.ndarray, xy_px: np.ndarray, ctype: np.ndarray, mpp: float, rng: np.random.Generator, part: str
) -> None:
    """Paint the cytoplasm or the nucleus of every cell, grouped by (type, shape variant) to vectorise."""
    n_variants = 6
    variant = rng.integers(0, n_variants, size=len(xy_px))
    for k, spec in enumerate(CELL_TYPES):
        base = spec.nucleus_um if part == "nucleus" else spec.cell_um
        rgb = spec.nucleus_rgb if part == "nucleus" else spec.cytoplasm_rgb
        if rgb is None:
            continue
        for v in range(n_variants):
            sel = np.flatnonzero((ctype == k) & (variant == v))
            if len(sel) == 0:
                continue
            radius = base / mpp * (0.85 + 0.3 * v / (n_variants - 1))
            offsets = _disc_offsets(radius, spec.elongation, np.pi * v / n_variants)
            jitter = rng.normal(0.0, 12.0 if part == "nucleus" else 6.0, size=(len(sel), 1))
            colours = np.clip(np.asarray(rgb)[None, :] + jitter, 0, 255)
            rows = np.round(xy_px[sel, 1]).astype(np.int64)
            cols = np.round(xy_px[sel, 0]).astype(np.int64)
            _stamp(img, rows, cols, offsets, colours)


def _type_fields(shape_um: tuple[float, float], rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """K smooth random fields on a coarse grid (spacing FIELD_SPACING_UM / 2), to be sampled by position."""
    step = FIELD_SPACING_UM / 2
    gh, gw = int(np.ceil(shape_um[0] / step)) + 3, int(np.ceil(shape_um[1] / step)) + 3
    noise = rng.normal(size=(len(CELL_TYPES), gh, gw))
    fields = np.stack([ndimage.gaussian_filter(f, sigma=1.2, mode="reflect") for f in noise])
    fields /= fields.std(axis=(1, 2), keepdims=True) + 1e-12
    return fields, step


def _fractions_at(fields: np.ndarray, step_um: float, xy_um: np.ndarray) -> np.ndarray:
    """Cell-type fractions (softmax of the smooth fields) at positions in µm, shape (n, K)."""
    coords = np.stack([xy_um[:, 1] / step_um + 1, xy_um[:, 0] / step_um + 1])
    z = np.stack([ndimage.map_coordinates(f, coords, order=3, mode="nearest") for f in fields], axis=1)
    z = FIELD_SHARPNESS * z
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _place_cells(
    height_um: float, width_um: float, fields: np.ndarray, step_um: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Cells on a jittered lattice thinned by the local density; returns (xy in µm, type index)."""
    density = np.array([t.density for t in CELL_TYPES])
    spacing = 1.0 / np.sqrt(density.max())
    gy, gx = np.mgrid[0 : height_um : spacing, 0 : width_um : spacing]
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1) + rng.uniform(0, spacing, size=(gx.size, 2))
    xy = xy[(xy[:, 0] < width_um) & (xy[:, 1] < height_um)]
    frac = _fractions_at(fields, step_um, xy)
    weight = frac * density[None, :]
    keep = rng.uniform(size=len(xy)) < weight.sum(axis=1) / density.max()
    xy, weight = xy[keep], weight[keep]
    cum = np.cumsum(weight / weight.sum(axis=1, keepdims=True), axis=1)
    ctype = (rng.uniform(size=(len(xy), 1)) > cum).sum(axis=1).clip(0, len(CELL_TYPES) - 1)
    return xy, ctype


def _stroma(height: int, width: int, mpp: float, rng: np.random.Generator) -> np.ndarray:
    """Pink background with fibre-like (anisotropic) intensity texture."""
    noise = rng.normal(size=(height, width)).astype(np.float32)
    fibres = ndimage.gaussian_filter(noise, sigma=(1.0 / mpp, 6.0 / mpp))
    fibres *= 18.0 / (fibres.std() + 1e-6)
    tint = np.array([0.4, 1.0, 0.6], dtype=np.float32)  # fibres vary mostly in the eosin (green) channel
    return np.clip(STROMA_RGB[None, None, :] + fibres[..., None] * tint, 0, 255)


def gene_programs(n_genes: int, program_seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gene names, per-gene kind and the (K, G) relative expression of each gene in each cell type.

    Kinds: "program" (mixture of type programs, learnable), "noise" (spatially random), "zero" (never
    detected), "constant" (same count in every spot), "rare" (detected in few spots).
    """
    if n_genes < N_EDGE_GENES + 2:
        raise ValueError(f"n_genes must be at least {N_EDGE_GENES + 2}, got {n_genes}")
    rng = np.random.default_rng([program_seed, 7919])
    n_noise = max(1, n_genes // 6)
    n_program = n_genes - n_noise - N_EDGE_GENES
    k = len(CELL_TYPES)
    level = np.exp(rng.normal(0.5, 1.2, size=n_program))  # spread of expression levels across genes
    primary = np.arange(n_program) % k
    mix = 0.15 + 0.4 * rng.uniform(size=(k, n_program))
    mix[primary, np.arange(n_program)] += 3.0
    program = mix * level[None, :]
    noise = np.broadcast_to(np.exp(rng.normal(0.5, 1.0, size=n_noise)), (k, n_noise))
    edge = np.zeros((k, N_EDGE_GENES))  # set per spot by make_synthetic_sample
    rates = np.concatenate([program, noise, edge], axis=1)
    kinds = np.array(["program"] * n_program + ["noise"] * n_noise + ["zero", "zero", "constant", "rare"])
    names = np.array(
        [f"PROG{i:03d}_{CELL_TYPES[primary[i]].name.upper()}" for i in range(n_program)]
        + [f"NOISE{i:03d}" for i in range(n_noise)]
        + ["ZERO000", "ZERO001", "CONST000", "RARE000"]
    )
    return names, kinds, rates


def _patient_rng(patient_id: str) -> np.random.Generator:
    """A generator fixed by the patient id (stable across runs: crc32, not Python's salted hash)."""
    return np.random.default_rng([zlib.crc32(patient_id.encode()), 104729])


def _paint_tissue(
    height: int, width: int, mpp: float, stain: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """RGB pixels plus the cells behind them: (pixels, cell xy in µm, cell type, type fields, field step)."""
    fields, step_um = _type_fields((height * mpp, width * mpp), rng)
    xy_um, ctype = _place_cells(height * mpp, width * mpp, fields, step_um, rng)
    xy_px = xy_um / mpp
    img = _stroma(height, width, mpp, rng)
    _stamp_cells(img, xy_px, ctype, mpp, rng, "cytoplasm")
    _stamp_cells(img, xy_px, ctype, mpp, rng, "nucleus")  # nuclei last: always visible on top
    img = ndimage.gaussian_filter(img, sigma=(0.6 / mpp, 0.6 / mpp, 0))  # soften stamp edges like optics
    grain = rng.normal(0.0, 4.0, size=(height, width, 1)).astype(np.float32)
    img = img * stain.astype(np.float32)[None, None, :] + grain
    return np.clip(img, 0, 255).astype(np.uint8), xy_um, ctype, fields, step_um


def _draw_counts(
    fractions: np.ndarray, kinds: np.ndarray, programs: np.ndarray, spot_depth: np.ndarray, dispersion: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(noiseless rates, negative-binomial counts) of each spot from its cell-type composition."""
    unit = fractions @ programs
    rates = unit / unit.sum(axis=1, keepdims=True) * spot_depth[:, None]  # library size ~ spot_depth
    noise_cols = kinds == "noise"
    rates[:, noise_cols] *= rng.gamma(4.0, 0.25, size=(len(rates), noise_cols.sum()))  # spot-random genes
    rates[:, kinds == "rare"] = 0.05  # detected in ~5 % of spots: below the default min_detected
    counts = rng.poisson(rates * rng.gamma(1.0 / dispersion, dispersion, size=rates.shape))
    counts[:, kinds == "constant"] = 3
    rates[:, kinds == "constant"] = 3.0
    return rates, counts


def make_synthetic_sample(
    sample_id: str = "syn0",
    *,
    grid: tuple[int, int] = (16, 16),
    pitch_um: float = 100.0,
    mpp: float = 1.0,
    n_genes: int = 60,
    seed: int = 0,
    patient_id: str | None = None,
    program_seed: int = 0,
    depth: float = 2000.0,
    dispersion: float = 0.1,
) -> Sample:
    """A synthetic section: a (rows, cols) spot grid on H&E-like texture, with negative-binomial counts.

    ``depth`` is the mean library size per spot; ``dispersion`` the negative binomial overdispersion
    (variance = mu + dispersion * mu²). The patient id shifts stain colour and sequencing depth slightly.
    """
    rng = np.random.default_rng([seed, 31337])
    pid = patient_id if patient_id is not None else sample_id
    prng = _patient_rng(pid)
    stain = 1.0 + prng.normal(0.0, 0.03, size=3)  # patient-level stain batch effect
    patient_depth = np.exp(prng.normal(0.0, 0.2))

    n_rows, n_cols = grid
    pitch_px = pitch_um / mpp
    margin_px = MARGIN_PITCHES * pitch_px
    height = int(np.ceil(2 * margin_px + (n_rows - 1) * pitch_px))
    width = int(np.ceil(2 * margin_px + (n_cols - 1) * pitch_px))
    pixels, cells_um, ctype, fields, step_um = _paint_tissue(height, width, mpp, stain, rng)

    rows, cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    centers = np.stack([margin_px + cols * pitch_px, margin_px + rows * pitch_px], axis=1)
    radius_um = SPOT_DIAMETER_FRACTION * pitch_um / 2
    fractions = _spot_composition(centers * mpp, cells_um, ctype, radius_um, fields, step_um)
    genes, kinds, programs = gene_programs(n_genes, program_seed)
    spot_depth = depth * patient_depth * np.exp(rng.normal(0.0, 0.3, size=len(centers)))
    rates, counts = _draw_counts(fractions, kinds, programs, spot_depth, dispersion, rng)

    return Sample(
        sample_id=sample_id,
        patient_id=pid,
        mpp=float(mpp),
        barcodes=np.array([f"{c}x{r}" for c, r in zip(cols, rows)]),
        centers=centers,
        image=ArrayImage(pixels, path=f"<synthetic {sample_id}>"),
        counts=sp.csr_matrix(counts.astype(np.float32)),
        genes=genes,
        array_coords=np.stack([cols, rows], axis=1),
        source="synthetic",
        patient_known=patient_id is not None,
        meta={
            "path": f"<synthetic {sample_id}>",
            "rates": rates.astype(np.float32),
            "type_fractions": fractions.astype(np.float32),
            "cell_types": [t.name for t in CELL_TYPES],
            "gene_kinds": kinds,
            "gene_programs": programs.astype(np.float32),
            "spot_diameter_um": SPOT_DIAMETER_FRACTION * pitch_um,
            "n_cells": int(len(cells_um)),
            "seed": seed,
            "program_seed": program_seed,
        },
    )


def _spot_composition(
    centers_um: np.ndarray, cells_um: np.ndarray, ctype: np.ndarray, radius_um: float, fields, step_um: float
) -> np.ndarray:
    """Fractions of each cell type among the cells inside each spot (the field prior fills sparse spots).

    Counting real cells makes expression follow what the image shows, not only the hidden fields.
    """
    from scipy.spatial import cKDTree

    k = len(CELL_TYPES)
    hits = cKDTree(cells_um).query_ball_point(centers_um, r=radius_um)
    counts = np.zeros((len(centers_um), k))
    for i, idx in enumerate(hits):
        counts[i] = np.bincount(ctype[idx], minlength=k)
    prior = _fractions_at(fields, step_um, centers_um)
    prior_weight = 2.0  # pseudo-cells: a spot with few cells leans on the smooth field
    return (counts + prior_weight * prior) / (counts.sum(axis=1, keepdims=True) + prior_weight)


def make_synthetic_dataset(n_samples: int = 4, n_patients: int = 2, seed: int = 0, **kw) -> list[Sample]:
    """``n_samples`` sections ("SYN0".."SYN<n-1>") of ``n_patients`` patients ("P0".."), one shared biology.

    Consecutive samples belong to the same patient (SYN0, SYN1 -> P0; SYN2, SYN3 -> P1 for 4 / 2).
    """
    if n_samples < 1 or not 1 <= n_patients <= n_samples:
        raise ValueError(f"need n_samples >= 1 and 1 <= n_patients <= n_samples, got {n_samples}, {n_patients}")
    kw.setdefault("program_seed", seed)
    return [
        make_synthetic_sample(
            f"SYN{i}", seed=seed * 1000 + i, patient_id=f"P{i * n_patients // n_samples}", **kw
        )
        for i in range(n_samples)
    ]


def write_synthetic_dataset(out_dir: str | Path, samples: list[Sample]) -> Path:
    """Write samples in the legacy-ST (her2st) layout plus ``samples.csv`` (sample_id,patient_id,mpp).

    Per sample S: ``S.jpg`` (quality 95), ``S.tsv.gz`` (spots x genes counts, first column "<x>x<y>"),
    ``S_selection.tsv`` (x y new_x new_y pixel_x pixel_y selected; pixel_x = image column).
    """
    import pandas as pd
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for s in samples:
        if s.counts is None or s.array_coords is None:
            raise ValueError(f"sample '{s.sample_id}' needs counts and array_coords to be written as legacy ST")
        pixels = s.image.read_region(0, 0, s.image.width, s.image.height).pixels
        Image.fromarray(pixels).save(out / f"{s.sample_id}.jpg", quality=95)
        spot_ids = [f"{x}x{y}" for x, y in s.array_coords]
        counts = pd.DataFrame(s.counts.toarray().astype(np.int64), index=spot_ids, columns=s.genes)
        with gzip.open(out / f"{s.sample_id}.tsv.gz", "wt", compresslevel=1) as fh:
            counts.to_csv(fh, sep="\t")
        selection = pd.DataFrame(
            {
                "x": s.array_coords[:, 0],
                "y": s.array_coords[:, 1],
                "new_x": s.array_coords[:, 0].astype(float),
                "new_y": s.array_coords[:, 1].astype(float),
                "pixel_x": s.centers[:, 0],
                "pixel_y": s.centers[:, 1],
                "selected": 1,
            }
        )
        selection.to_csv(out / f"{s.sample_id}_selection.tsv", sep="\t", index=False)
        table.append({"sample_id": s.sample_id, "patient_id": s.patient_id, "mpp": s.mpp})
    pd.DataFrame(table).to_csv(out / "samples.csv", index=False)
    return out
