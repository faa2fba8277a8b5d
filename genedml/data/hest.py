"""HEST-1k layout: ``st/<id>.h5ad`` (``obsm['spatial']`` in level-0 pixels of the WSI), ``wsis/<id>.tif``
(pyramidal TIFF) and ``metadata/<id>.json`` (``pixel_size_um_estimated``, patient fields)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from genedml.data.anndata_reader import HEST_MPP_KEYS, read_h5ad, sample_from_anndata
from genedml.data.formats import IMAGE_SUFFIXES, open_image
from genedml.data.reader import ReadOptions, reject_image
from genedml.data.sample import Sample
from genedml.data.samples_table import read_sections, resolve_mpp
from genedml.errors import InputError

WSI_SUFFIXES = IMAGE_SUFFIXES
MPP_KEYS = HEST_MPP_KEYS
PATIENT_KEYS = ("patient", "patient_id", "subject")


def hest_ids(folder: str | Path) -> list[str]:
    """Sample ids of a HEST folder: the stems of ``st/*.h5ad`` (sorted)."""
    return sorted(p.stem for p in (Path(folder) / "st").glob("*.h5ad"))


def read_hest(
    folder: str | Path,
    samples: Iterable[str] | str | None = None,
    mpp: float | None = None,
    samples_table=None,
) -> list[Sample]:
    """Read every (or the chosen) sample of a HEST-1k style folder."""
    folder = Path(folder)
    return read_sections(folder, hest_ids(folder), samples, mpp, samples_table, _read_one,
                         "no st/<id>.h5ad files found (HEST-1k layout: st/, wsis/, metadata/).")


def read_metadata(folder: Path, sample_id: str) -> dict:
    """``metadata/<id>.json`` as a dict ({} when absent)."""
    path = folder / "metadata" / f"{sample_id}.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"Cannot parse HEST metadata {path}: {exc}.") from exc


def _read_one(folder: Path, sample_id: str, mpp: float | None, table) -> Sample:
    h5ad = folder / "st" / f"{sample_id}.h5ad"
    where = f"sample '{sample_id}' ({h5ad})"
    candidates = [folder / "wsis" / f"{sample_id}{suffix}" for suffix in WSI_SUFFIXES]
    wsi = next((path for path in candidates if path.is_file()), None)
    if wsi is None:
        raise InputError(f"{where}: no slide found (looked for wsis/{sample_id}{{{','.join(WSI_SUFFIXES)}}}).")
    metadata = read_metadata(folder, sample_id)
    mpp_file = next((float(metadata[k]) for k in MPP_KEYS if metadata.get(k) is not None), None)
    resolved = resolve_mpp(
        sample_id, where, given=mpp, table=table, from_file=mpp_file,
        how=f"metadata/{sample_id}.json ({' or '.join(MPP_KEYS)})",
    )
    patient = next((str(metadata[k]) for k in PATIENT_KEYS if metadata.get(k) is not None), None)
    return sample_from_anndata(
        read_h5ad(h5ad), sample_id=sample_id, image=open_image(wsi), mpp=resolved, table=table, source="hest",
        where=where, patient_from_file=patient,
        meta={"path": str(h5ad), "image": str(wsi), "metadata": metadata},
    )


class HestReader:
    """HEST-1k layout: ``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``."""

    name = "hest"
    looks_for = "st/<id>.h5ad + wsis/ (hest)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and bool(hest_ids(path))

    def read(self, path: Path, options: ReadOptions) -> list[Sample]:
        reject_image(self.name, path, options)
        return read_hest(path, samples=options.samples, mpp=options.mpp, samples_table=options.samples_table)
