"""One entry point for every input format: detect the layout of a path, read its samples, summarise them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from genedml.data.anndata_reader import AnnDataReader
from genedml.data.authors_layout import AuthorsLayoutReader
from genedml.data.hest import HestReader
from genedml.data.image import RegionReader
from genedml.data.legacy_st import LegacySTReader
from genedml.data.reader import Reader, ReadOptions
from genedml.data.sample import Sample
from genedml.data.spaceranger import SpaceRangerReader
from genedml.data.spatialdata_reader import SpatialDataReader
from genedml.data.visium_hd import VisiumHDReader
from genedml.errors import InputError
from genedml.data.samples_table import SamplesTable, load_samples_table
from genedml.log import log

# Detection order: the first reader whose `detect` says yes reads the path. AnnData comes last: its folder form
# (one .h5ad + one image) must not take a folder another layout explains.
READERS: list[Reader] = [
    HestReader(), VisiumHDReader(), SpaceRangerReader(), LegacySTReader(), AuthorsLayoutReader(), SpatialDataReader(),
    AnnDataReader(),
]
FORMATS = tuple(reader.name for reader in READERS)
DEFAULT_SAMPLES_TABLE = "samples.csv"
BINNED_FORMATS = ("visium-hd", "spatialdata")  # formats that take bin_size_um


def reader_for(path: str | Path, format: str | None = None) -> Reader:
    """The reader named `format`, or the first one that detects `path`."""
    path = Path(path)
    if format is not None:
        match = [r for r in READERS if r.name == format]
        if not match:
            raise InputError(f"Unknown input format {format!r}; choose one of {list(FORMATS)}.")
        return match[0]
    if not path.exists():
        raise InputError(f"Input not found: {path}.")
    for reader in READERS:
        if reader.detect(path):
            return reader
    looked_for = "; ".join(r.looks_for for r in READERS)
    what = "a file that is not .h5ad" if path.is_file() else "no known input layout found"
    raise InputError(f"{path}: {what}. Looked for {looked_for}.")


def detect_format(path: str | Path) -> str:
    """The name of the reader that fits `path` (see `READERS`)."""
    return reader_for(path).name


def read_samples(
    path: str | Path,
    *,
    samples: Iterable[str] | str | None = None,
    mpp: float | None = None,
    samples_table: Any = None,
    image: str | Path | RegionReader | None = None,
    format: str | None = None,
    bin_size_um: float | None = None,
) -> list[Sample]:
    """Read all (or the chosen) samples under `path`, whatever its format (auto-detected unless given).

    `image` applies to single-sample formats (anndata, spaceranger, visium-hd) whose image lives elsewhere;
    `bin_size_um` to Visium HD runs (default: 8 µm, or the ``square_*um`` folder `path` names).
    A `samples.csv` (sample_id,patient_id[,mpp]) inside a dataset folder is used when no table is given.
    """
    path = Path(path)
    reader = reader_for(path, format)
    if bin_size_um is not None and reader.name not in BINNED_FORMATS:
        raise InputError(f"{path}: bin_size_um applies to {' and '.join(BINNED_FORMATS)} inputs, not {reader.name}.")
    if samples_table is None and path.is_dir() and (path / DEFAULT_SAMPLES_TABLE).is_file():
        samples_table = path / DEFAULT_SAMPLES_TABLE
    table = load_samples_table(samples_table)
    options = ReadOptions(samples=samples, mpp=mpp, samples_table=table, image=image, bin_size_um=bin_size_um)
    read = reader.read(path, options)
    _warn_unmatched_table(read, table, samples_table, path)
    return read


def _warn_unmatched_table(read: list[Sample], table: SamplesTable, source: Any, path: Path) -> None:
    """A samples table that misses some samples read leaves their patient unknown (each its own patient in
    `cv --by patient`, so one patient's sections can land on both sides): say which, and name the table's
    ids that match nothing, the likely typos."""
    if not table:
        return
    absent = [s.sample_id for s in read if s.sample_id not in table]
    if absent:
        names = {s.sample_id for s in read}
        extra = sorted(set(table) - names)
        hint = f"; the table names {extra[:10]}, which are not samples of {path} (a typo?)" if extra else ""
        log.warning("samples %s are not in the samples table %s: their patient comes from the file or is unknown%s",
                    absent[:10], source if isinstance(source, (str, Path)) else "given", hint)


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
