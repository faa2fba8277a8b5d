"""One entry point for every input format: detect the layout of a path, read its samples, summarise them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genedml.data.anndata_reader import read_anndata
from genedml.data.hest import hest_ids, read_hest
from genedml.data.image import RegionReader
from genedml.data.legacy_st import legacy_st_ids, read_legacy_st
from genedml.data.sample import Sample
from genedml.data.spaceranger import read_spaceranger, spaceranger_root
from genedml.errors import InputError

FORMATS = ("legacy-st", "anndata", "hest", "spaceranger")
LOOKED_FOR = (
    "a .h5ad file (anndata); st/<id>.h5ad + wsis/ (hest); spatial/tissue_positions*.csv|parquet + "
    "filtered_feature_bc_matrix.h5, also under outs/ (spaceranger); <id>_selection.tsv + <id>.tsv.gz + "
    "<id>.jpg (legacy-st)"
)


DEFAULT_SAMPLES_TABLE = "samples.csv"


def detect_format(path: str | Path) -> str:
    """Which reader fits `path`: "anndata" | "hest" | "spaceranger" | "legacy-st"."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"Input not found: {path}.")
    if path.is_file():
        if path.suffix.lower() == ".h5ad":
            return "anndata"
        raise InputError(f"{path}: a file that is not .h5ad; expected {LOOKED_FOR}.")
    if hest_ids(path):
        return "hest"
    if spaceranger_root(path) is not None:
        return "spaceranger"
    if legacy_st_ids(path):
        return "legacy-st"
    raise InputError(f"{path}: no known input layout found. Looked for {LOOKED_FOR}.")


def read_samples(
    path: str | Path,
    *,
    samples: Iterable[str] | str | None = None,
    mpp: float | None = None,
    samples_table=None,
    image: str | Path | RegionReader | None = None,
    format: str | None = None,
) -> list[Sample]:
    """Read all (or the chosen) samples under `path`, whatever its format (auto-detected unless given).

    `image` applies to single-sample formats (anndata, spaceranger) whose image lives elsewhere.
    A `samples.csv` (sample_id,patient_id[,mpp]) inside a dataset folder is used when no table is given.
    """
    kind = format or detect_format(path)
    if samples_table is None and Path(path).is_dir() and (Path(path) / DEFAULT_SAMPLES_TABLE).is_file():
        samples_table = Path(path) / DEFAULT_SAMPLES_TABLE
    if kind not in FORMATS:
        raise InputError(f"Unknown input format {kind!r}; choose one of {list(FORMATS)}.")
    common = {"samples": samples, "mpp": mpp, "samples_table": samples_table}
    if kind in ("hest", "legacy-st"):
        if image is not None:
            raise InputError(f"{path}: image= applies to anndata/spaceranger inputs; {kind} finds its own images.")
        reader = read_hest if kind == "hest" else read_legacy_st
        return reader(path, **common)
    reader = read_anndata if kind == "anndata" else read_spaceranger
    return [reader(path, image, **common)]


def inspect_samples(path: str | Path, **kwargs: Any) -> list[dict]:
    """One summary row per sample (spots, genes, mpp, patient, format, image path and size).

    Reads counts and image headers only; pixels are never decoded.
    """
    kind = kwargs.pop("format", None) or detect_format(path)
    return [
        {
            "sample_id": s.sample_id,
            "spots": s.n_spots,
            "genes": s.n_genes,
            "mpp": s.mpp,
            "patient": s.patient_id if s.patient_known else None,
            "format": kind,
            "image": {"path": s.image.path, "width": s.image.width, "height": s.image.height},
        }
        for s in read_samples(path, format=kind, **kwargs)
    ]
