"""The layout the Gene-DML and TRIPLEX authors prepare her2st, ST-Net and cSCC in, read as their code reads it:

- ``ST-spotfiles/<name>_selection.tsv``: one row per spot (``x``, ``y`` array and ``pixel_x``, ``pixel_y``
  image coordinates); the sample names are these files;
- ``ST-cnts/<name>_sub.parquet`` (or ``<name>_stdata.parquet``): spots × genes counts indexed by
  ``"<round(x)>x<round(y)>"``; spots are the rows both tables share (the ``selected`` column is not used);
- ``ST-imgs/<name[0]>/<name>/<one image>`` (her2st, by patient letter) or ``ST-imgs/*<name>.<ext>``.

µm/px is inferred from the 200 µm legacy-ST spot pitch, as for the legacy-ST reader.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from genedml.data.formats import IMAGE_SUFFIXES, open_image
from genedml.data.legacy_st import SELECTION_SUFFIX, infer_mpp, read_spot_table
from genedml.data.reader import ReadOptions, reject_image
from genedml.data.sample import Sample
from genedml.data.samples_table import MPP_HINT, read_sections, resolve_mpp, resolve_patient
from genedml.data.spots import check_not_empty, check_unique, join_counts
from genedml.errors import InputError
from genedml.log import log

SPOTS, COUNTS, IMAGES = "ST-spotfiles", "ST-cnts", "ST-imgs"
COUNT_SUFFIXES = ("_sub.parquet", "_stdata.parquet")


def authors_ids(folder: str | Path) -> list[str]:
    """Sample names of an authors-layout folder: every ``ST-spotfiles/<name>_selection.tsv`` (sorted)."""
    spots = Path(folder) / SPOTS
    return sorted(p.name[: -len(SELECTION_SUFFIX)] for p in spots.glob(f"*{SELECTION_SUFFIX}"))


def read_authors_layout(
    folder: str | Path,
    samples: Iterable[str] | str | None = None,
    mpp: float | None = None,
    samples_table=None,
) -> list[Sample]:
    """Read every (or the chosen) section of a Gene-DML/TRIPLEX data folder (e.g. ``data/her2st``)."""
    folder = Path(folder)
    return read_sections(folder, authors_ids(folder), samples, mpp, samples_table, _read_section,
                         f"no {SPOTS}/*{SELECTION_SUFFIX} spot tables found (Gene-DML/TRIPLEX layout).")


def find_image(folder: Path, name: str) -> tuple[Path, str | None]:
    """(image, patient) of a section: ``ST-imgs/<name[0]>/<name>/`` (her2st; the letter is the patient), else the
    one image in ``ST-imgs/`` whose stem ends with `name` (an exact stem wins)."""
    images = folder / IMAGES
    nested = images / name[:1] / name
    if nested.is_dir():
        found = sorted(p for p in nested.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if len(found) != 1:
            raise InputError(f"{nested}: expected one image of section '{name}', found {[p.name for p in found]}.")
        return found[0], name[:1]
    candidates = sorted(
        p for p in images.glob(f"*{name}.*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.stem.endswith(name)
    )
    exact = [p for p in candidates if p.stem == name]
    found = exact or candidates
    if len(found) != 1:
        raise InputError(
            f"{images}: expected one image of section '{name}' ({name[:1]}/{name}/<image> or *{name}.<ext>), "
            f"found {[p.name for p in found] or 'none'}."
        )
    return found[0], None


def _read_section(folder: Path, name: str, mpp: float | None, table) -> Sample:
    spots_path = folder / SPOTS / f"{name}{SELECTION_SUFFIX}"
    where = f"sample '{name}' ({spots_path})"
    spots = read_spot_table(spots_path, drop_unselected=False)  # the authors' code keeps every row with counts
    grid = np.around(spots[["x", "y"]].to_numpy(np.float64)).astype(np.int64)
    barcodes = np.array([f"{x}x{y}" for x, y in grid])
    check_unique(barcodes, str(spots_path), "spot table (ids round(x)xround(y))")
    check_not_empty(len(barcodes), str(spots_path), "the spot table is empty")

    counts_path = next((p for s in COUNT_SUFFIXES if (p := folder / COUNTS / f"{name}{s}").is_file()), None)
    if counts_path is None:
        looked = " or ".join(f"{COUNTS}/{name}{s}" for s in COUNT_SUFFIXES)
        raise InputError(f"{folder}: no counts for sample '{name}' (looked for {looked}).")
    genes, count_barcodes, counts = read_parquet_counts(counts_path)
    keep, counts = join_counts(barcodes, count_barcodes, counts, f"sample '{name}' ({counts_path})")
    spots, barcodes, grid = spots[keep].reset_index(drop=True), barcodes[keep], grid[keep]
    if "selected" in spots.columns and (spots["selected"] == 0).any():
        log.info("%s: kept %d spots with selected == 0 that have counts (as the authors' code does)",
                 where, int((spots["selected"] == 0).sum()))

    overridden = mpp is not None or (name in table and table[name].mpp is not None)
    inferred = None if overridden else _pitch_mpp(spots, grid, where)
    image_path, patient_from_layout = find_image(folder, name)
    image = open_image(image_path)
    pixels = spots[["pixel_x", "pixel_y"]].to_numpy(np.float64)
    if _outside(pixels, image) and not _outside(pixels[:, ::-1], image):
        log.warning("%s: pixel_x/pixel_y fit %s only when swapped (the TRIPLEX test-set convention); swapped them",
                    where, image_path)
        pixels, grid = pixels[:, ::-1], grid[:, ::-1]
    patient, known = resolve_patient(name, table, patient_from_layout)
    return Sample(
        sample_id=name, patient_id=patient, mpp=resolve_mpp(name, where, given=mpp, table=table, from_file=inferred,
                                                            how="the 200 µm spot pitch"),
        barcodes=barcodes, centers=pixels, image=image, counts=counts, genes=genes, array_coords=grid,
        source="authors", patient_known=known,
        meta={"path": str(folder), "counts": str(counts_path), "spots": str(spots_path), "image": str(image_path)},
    )


def read_parquet_counts(path: Path) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
    """(genes, spot ids, counts as float32 CSR) from a spots × genes parquet indexed by spot id."""
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read counts table {path}: {exc}.") from exc
    if isinstance(frame.index, pd.RangeIndex) and len(frame.columns) and frame.dtypes.iloc[0] == object:
        frame = frame.set_index(frame.columns[0])  # ids written as a column rather than the index
    values = frame.to_numpy()
    if not np.issubdtype(values.dtype, np.number):
        numeric = frame.apply(pd.to_numeric, errors="coerce")
        bad = numeric.isna() & frame.notna()
        raise InputError(f"{path}: non-numeric counts in rows {frame.index[bad.any(axis=1)][:10].tolist()}.")
    counts = sp.csr_matrix(values.astype(np.float32))  # NaN stays, and Sample.validate names its rows
    return frame.columns.to_numpy().astype(str), frame.index.to_numpy().astype(str), counts


def _outside(pixels: np.ndarray, image) -> bool:
    return bool(((pixels < 0) | (pixels >= [image.width, image.height])).any())


def _pitch_mpp(spots: pd.DataFrame, grid: np.ndarray, where: str) -> float:
    """µm/px from the legacy-ST pitch; a hexagonal (Visium) grid has another pitch, so it must be given."""
    if len(grid) >= 10 and (grid.sum(axis=1) % 2 == 0).all():
        raise InputError(f"{where}: the array coordinates form a hexagonal (Visium) grid, not legacy ST. {MPP_HINT}")
    return infer_mpp(spots.assign(x=grid[:, 0], y=grid[:, 1]), where)


class AuthorsLayoutReader:
    """Gene-DML / TRIPLEX data folder: ``ST-spotfiles/``, ``ST-cnts/``, ``ST-imgs/``."""

    name = "authors"
    looks_for = "ST-spotfiles/<name>_selection.tsv + ST-cnts/<name>_sub.parquet + ST-imgs/ (authors)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / COUNTS).is_dir() and bool(authors_ids(path))

    def read(self, path: Path, options: ReadOptions) -> list[Sample]:
        reject_image(self.name, path, options)
        return read_authors_layout(path, samples=options.samples, mpp=options.mpp, samples_table=options.samples_table)
