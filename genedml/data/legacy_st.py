"""Legacy Spatial Transcriptomics (her2st layout): ``S.jpg``, ``S.tsv.gz`` (spots × genes) and
``S_selection.tsv`` (array and pixel coordinates of each spot)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from genedml.data.formats import open_image
from genedml.data.reader import ReadOptions, reject_image
from genedml.data.sample import Sample
from genedml.data.samples_table import MPP_HINT, read_sections, resolve_mpp, resolve_patient
from genedml.data.spots import check_not_empty, check_unique, join_counts
from genedml.errors import InputError
from genedml.log import log


ST_PITCH_UM = 200.0  # centre-to-centre distance of legacy ST spots
SELECTION_SUFFIX = "_selection.tsv"
COUNT_SUFFIXES = (".tsv.gz", ".tsv")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
SELECTION_COLUMNS = ("x", "y", "pixel_x", "pixel_y")


def legacy_st_ids(folder: str | Path) -> list[str]:
    """Sample ids of a legacy-ST folder: every ``S_selection.tsv`` (sorted)."""
    return sorted(p.name[: -len(SELECTION_SUFFIX)] for p in Path(folder).glob(f"*{SELECTION_SUFFIX}"))


def read_legacy_st(
    folder: str | Path,
    samples: Iterable[str] | str | None = None,
    mpp: float | None = None,
    samples_table=None,
) -> list[Sample]:
    """Read every (or the chosen) section of a her2st-style folder."""
    folder = Path(folder)
    return read_sections(folder, legacy_st_ids(folder), samples, mpp, samples_table, _read_section,
                         f"no '*{SELECTION_SUFFIX}' spot tables found (legacy ST layout).")


def _find(folder: Path, sample_id: str, suffixes: tuple[str, ...], what: str) -> Path:
    for suffix in suffixes:
        path = folder / f"{sample_id}{suffix}"
        if path.is_file():
            return path
    looked = ", ".join(f"{sample_id}{s}" for s in suffixes)
    raise InputError(f"{folder}: no {what} for sample '{sample_id}' (looked for {looked}).")


def _read_section(folder: Path, sample_id: str, mpp: float | None, table) -> Sample:
    spots_path = folder / f"{sample_id}{SELECTION_SUFFIX}"
    counts_path = _find(folder, sample_id, COUNT_SUFFIXES, "counts table")
    image_path = _find(folder, sample_id, IMAGE_SUFFIXES, "image")
    spots = read_spot_table(spots_path)
    barcodes = (spots["x"].astype(int).astype(str) + "x" + spots["y"].astype(int).astype(str)).to_numpy()
    check_unique(barcodes, str(spots_path))
    check_not_empty(len(barcodes), str(spots_path), "the spot table has no selected rows")

    genes, count_barcodes, counts = _read_counts(counts_path)
    keep, counts = join_counts(barcodes, count_barcodes, counts, f"sample '{sample_id}' ({counts_path})")
    spots, barcodes = spots[keep], barcodes[keep]

    where = f"sample '{sample_id}' ({spots_path})"
    overridden = mpp is not None or (sample_id in table and table[sample_id].mpp is not None)
    inferred = None if overridden else infer_mpp(spots, where)
    patient, known = resolve_patient(sample_id, table)
    return Sample(
        sample_id=sample_id,
        patient_id=patient,
        mpp=resolve_mpp(sample_id, where, given=mpp, table=table, from_file=inferred, how="the spot pitch"),
        barcodes=barcodes,
        centers=spots[["pixel_x", "pixel_y"]].to_numpy(np.float64),
        image=open_image(image_path),
        counts=counts,
        genes=genes,
        array_coords=spots[["x", "y"]].to_numpy(np.int64),
        source="legacy-st",
        patient_known=known,
        meta={"path": str(folder), "counts": str(counts_path), "spots": str(spots_path), "image": str(image_path)},
    )


def read_spot_table(path: Path, drop_unselected: bool = True) -> pd.DataFrame:
    """A ``*_selection.tsv`` spot table with numeric x, y, pixel_x, pixel_y (rows with selected == 0 dropped)."""
    spots = pd.read_csv(path, sep="\t", engine="c")
    missing = [c for c in SELECTION_COLUMNS if c not in spots.columns]
    if missing:
        raise InputError(
            f"{path}: missing columns {missing}; expected 'x y new_x new_y pixel_x pixel_y selected', "
            f"got {list(spots.columns)}."
        )
    coords = spots[list(SELECTION_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise InputError(f"{path}: non-numeric or empty coordinates in data rows {np.flatnonzero(bad)[:10].tolist()}.")
    if drop_unselected and "selected" in spots.columns:
        unselected = spots["selected"] == 0
        if unselected.any():
            log.info("%s: skipped %d spots with selected == 0", path, int(unselected.sum()))
            spots = spots[~unselected]
    return spots.reset_index(drop=True)


def _read_counts(path: Path) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """(genes, spot ids, counts as float32 CSR) from a spots × genes TSV (first column = spot id)."""
    try:
        frame = pd.read_csv(path, sep="\t", index_col=0, engine="c")
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"Cannot read counts table {path}: {exc}.") from exc
    values = frame.to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        numeric = frame.apply(pd.to_numeric, errors="coerce")
        bad = numeric.isna() & frame.notna()
        rows = frame.index[bad.any(axis=1)]
        raise InputError(f"{path}: non-numeric counts in rows {rows[:10].tolist()}.")
    counts = sp.csr_matrix(values.astype(np.float32))
    return frame.columns.to_numpy().astype(str), frame.index.to_numpy().astype(str), counts


def infer_mpp(spots: pd.DataFrame, where: str) -> float:
    """µm per pixel from the spot pitch: least-squares affine fit pixel ~ array coords, 200 µm per step."""
    grid = spots[["x", "y"]].to_numpy(np.float64)
    pixels = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    design = np.column_stack([grid, np.ones(len(grid))])
    if len(grid) < 3 or np.linalg.matrix_rank(design) < 3:
        raise InputError(
            f"{where}: cannot infer the pixel size from {len(grid)} spots on one line. {MPP_HINT}"
        )
    coef, *_ = np.linalg.lstsq(design, pixels, rcond=None)
    step_x, step_y = np.linalg.norm(coef[0]), np.linalg.norm(coef[1])  # px per array step along x and y
    if not (step_x > 0 and step_y > 0):
        raise InputError(f"{where}: pixel coordinates do not vary with the array coordinates. {MPP_HINT}")
    if max(step_x, step_y) / min(step_x, step_y) > 1.1:
        log.warning("%s: spot pitch differs between axes (%.1f vs %.1f px)", where, step_x, step_y)
    mpp = ST_PITCH_UM / ((step_x + step_y) / 2)
    log.info("%s: inferred mpp %.4f µm/px from a spot pitch of %.1f x %.1f px", where, mpp, step_x, step_y)
    return float(mpp)


class LegacySTReader:
    """her2st layout: ``S_selection.tsv`` + ``S.tsv.gz`` + ``S.jpg`` per section."""

    name = "legacy-st"
    looks_for = "<id>_selection.tsv + <id>.tsv.gz + <id>.jpg (legacy-st)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and bool(legacy_st_ids(path))

    def read(self, path: Path, options: ReadOptions) -> list[Sample]:
        reject_image(self.name, path, options)
        return read_legacy_st(path, samples=options.samples, mpp=options.mpp, samples_table=options.samples_table)
