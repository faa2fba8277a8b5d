"""AnnData (.h5ad) + image: spot centres from ``obsm['spatial']``, counts from X (or ``layers['counts']``),
pixel size from the scale factors (spot size by platform: Visium, legacy ST as HEST writes it, Visium HD bins)
or given. Also the AnnData → Sample step the HEST reader reuses."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from genedml.data.formats import IMAGE_SUFFIXES, open_image
from genedml.data.image import RegionReader
from genedml.data.reader import ReadOptions
from genedml.data.sample import Sample
from genedml.data.samples_table import MPP_HINT, load_samples_table, resolve_mpp, resolve_patient, select_ids
from genedml.data.spots import check_unique, unique_gene_names
from genedml.data.visium import VISIUM_SPOT_UM, fullres_mpp, image_scale, platform_from_barcodes, platform_spot_um
from genedml.errors import InputError
from genedml.log import log


IMAGE_PATH_KEYS = ("source_image_path", "image_path", "fullres_image_path")
TECHNOLOGY_KEYS = ("st_technology", "chemistry_description", "technology", "platform")
HEST_MPP_KEYS = ("pixel_size_um_estimated", "pixel_size_um_embedded")
GENE_ID_COLUMNS = ("gene_ids", "gene_id")


def read_h5ad(path: str | Path):
    """Open an .h5ad fully in memory, turning read failures into InputError."""
    import anndata

    path = Path(path)
    if not path.is_file():
        raise InputError(f"AnnData file not found: {path}.")
    try:
        with warnings.catch_warnings():  # duplicated names are made unique, and logged, when the Sample is built
            warnings.filterwarnings("ignore", message=r"(Variable|Observation) names are not unique")
            return anndata.read_h5ad(path)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"Cannot read AnnData file {path}: {exc}.") from exc


def read_anndata(
    h5ad: str | Path,
    image: str | Path | RegionReader | None = None,
    mpp: float | None = None,
    *,
    sample_id: str | None = None,
    library_id: str | None = None,
    samples: Iterable[str] | str | None = None,
    samples_table=None,
) -> Sample:
    """One sample from an .h5ad; `image` defaults to the full-res image named in ``uns['spatial']``.

    When `image` is a Space Ranger hires/lowres image (or HEST's ``downscaled_fullres``), full-res
    ``obsm['spatial']`` and the pixel size are scaled by ``tissue_hires_scalef``/``tissue_lowres_scalef``/
    ``tissue_downscaled_fullres_scalef`` (logged and recorded in ``meta``).
    """
    h5ad = Path(h5ad)
    sample_id = sample_id or h5ad.stem
    select_ids([sample_id], samples, str(h5ad))
    adata = read_h5ad(h5ad)
    where = f"sample '{sample_id}' ({h5ad})"
    library = _library(adata, library_id, where)
    spatial = adata.uns.get("spatial", {}).get(library, {}) if library else {}
    scalefactors = spatial.get("scalefactors")

    reader, image_path = _open_image(image, spatial.get("metadata") or {}, h5ad, where)
    known = {name: (arr.shape[1], arr.shape[0]) for name, arr in (spatial.get("images") or {}).items()}
    scale, resolution = image_scale(image_path, (reader.width, reader.height), scalefactors, known, where)
    table = load_samples_table(samples_table)
    mpp_file, how = None, "uns['spatial'][...]['scalefactors']"
    if mpp is None and (sample_id not in table or table[sample_id].mpp is None):  # else never used: stay quiet
        mpp_file, how = _fullres_mpp(adata, h5ad, spatial, where)
    resolved = resolve_mpp(
        sample_id, where, given=mpp, table=table, from_file=None if mpp_file is None else mpp_file / scale, how=how,
    )
    return sample_from_anndata(
        adata, sample_id=sample_id, image=reader, mpp=resolved, table=table, source="anndata",
        where=where, scale=scale,
        meta={"path": str(h5ad), "image": image_path, "library_id": library, "image_resolution": resolution},
    )


def _fullres_mpp(adata: Any, h5ad: Path, spatial: dict, where: str) -> tuple[float | None, str]:
    """µm per full-res pixel of an AnnData: a HEST ``metadata/<id>.json`` next to ``st/<id>.h5ad`` wins; else the
    scale factors, with the spot size of the platform the file names (or, with a warning, its barcodes suggest)."""
    hest_json = h5ad.parent.parent / "metadata" / f"{h5ad.stem}.json"
    if h5ad.parent.name == "st" and hest_json.is_file():
        try:
            metadata = json.loads(hest_json.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"Cannot parse HEST metadata {hest_json}: {exc}.") from exc
        value = next((metadata[k] for k in HEST_MPP_KEYS if metadata.get(k) is not None), None)
        if value is not None:
            return float(value), f"{hest_json} ({' or '.join(HEST_MPP_KEYS)})"
    scalefactors = spatial.get("scalefactors") or {}
    needs_spot = "spot_diameter_fullres" in scalefactors and not {"microns_per_pixel", "bin_size_um"} & set(scalefactors)
    spot_um = spot_diameter_um(adata, spatial, where) if needs_spot else VISIUM_SPOT_UM
    mpp, how = fullres_mpp(scalefactors, where, spot_um)
    return mpp, f"uns['spatial'][...]: {how}"


def spot_diameter_um(adata: Any, spatial: dict, where: str) -> float:
    """The spot diameter (µm) behind ``spot_diameter_fullres``: 55 µm Visium spots, 100 µm legacy ST spots (as
    HEST writes them), the bin size of Visium HD. Read from the platform the file records (HEST
    ``spot_diameter``/``st_technology``, Space Ranger ``chemistry_description``, in ``uns['spatial'][lib]
    ['metadata']``, ``uns`` or a constant obs column); else guessed from the barcodes, with a warning."""
    barcodes = adata.obs_names
    places = [("uns['spatial'][...]['metadata']", spatial.get("metadata") or {}), ("uns", adata.uns)]
    for key in TECHNOLOGY_KEYS + ("spot_diameter",):
        if key in adata.obs.columns and adata.obs[key].nunique() == 1:
            places.append((f"obs['{key}']", {key: adata.obs[key].iloc[0]}))
    for place, mapping in places:
        diameter = mapping.get("spot_diameter")
        if isinstance(diameter, (int, float, np.number)) and diameter > 0:
            log.info("%s: spot diameter %.4g µm from %s['spot_diameter']", where, diameter, place)
            return float(diameter)
        for key in TECHNOLOGY_KEYS:
            if isinstance(mapping.get(key), str) and (known := platform_spot_um(mapping[key], barcodes)):
                log.info("%s: %s spots of %g µm (%s['%s'] = %r)", where, known[1], known[0], place, key, mapping[key])
                return known[0]
    guessed = platform_from_barcodes(barcodes)
    if guessed is not None:
        log.warning(
            "%s: the file does not name its platform; barcodes look like %s, so spot_diameter_fullres is taken as "
            "%g µm. %s", where, guessed[1], guessed[0], MPP_HINT,
        )
        return guessed[0]
    log.warning(
        "%s: the file does not name its platform and the barcodes do not tell; spot_diameter_fullres is taken "
        "as a %g µm Visium spot. %s", where, VISIUM_SPOT_UM, MPP_HINT,
    )
    return VISIUM_SPOT_UM


def sample_from_anndata(
    adata: Any,
    *,
    sample_id: str,
    image: RegionReader,
    mpp: float,
    table,
    source: str,
    where: str,
    scale: float = 1.0,
    patient_from_file: str | None = None,
    meta: dict | None = None,
) -> Sample:
    """Build a Sample from an in-memory AnnData whose ``obsm['spatial']`` is in full-res pixels × `scale`."""
    if "spatial" not in adata.obsm:
        raise InputError(f"{where}: no obsm['spatial'] (spot centres, x = column, y = row) in the AnnData.")
    centers = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2] * scale
    barcodes = adata.obs_names.to_numpy().astype(str)
    check_unique(barcodes, where, "obs_names")
    counts, genes, counts_source, gene_ids = choose_counts(adata, where)
    array_coords = None
    if {"array_row", "array_col"} <= set(adata.obs.columns):
        array_coords = adata.obs[["array_col", "array_row"]].to_numpy(np.int64)
    patient, known = resolve_patient(sample_id, table, patient_from_file)
    meta = dict(meta or {}, counts_source=counts_source, coordinate_scale=scale)
    return Sample(
        sample_id=sample_id, patient_id=patient, mpp=mpp, barcodes=barcodes, centers=centers, image=image,
        counts=counts, genes=genes, gene_ids=gene_ids, array_coords=array_coords, source=source,
        patient_known=known, meta=meta,
    )


def choose_counts(adata: Any, where: str) -> tuple[sp.csr_matrix, np.ndarray, str, np.ndarray | None]:
    """(raw counts, unique gene names, where the counts came from, gene ids or None).

    Counts: X when it holds integers, else ``layers['counts']``, else ``raw.X``; else X with a warning. Gene
    names are the var names made unique as scanpy does; ids come from ``var['gene_ids']`` (or ``gene_id``).
    """
    candidates = [("X", adata.X, adata.var)]
    if "counts" in adata.layers:
        candidates.append(("layers['counts']", adata.layers["counts"], adata.var))
    if adata.raw is not None:
        candidates.append(("raw.X", adata.raw.X, adata.raw.var))
    chosen = next(((n, m, v) for n, m, v in candidates if m is not None and _integer_like(m)), None)
    if chosen is None:
        if adata.X is None:
            raise InputError(f"{where}: the AnnData has no X and no layers['counts'].")
        log.warning(
            "%s: X holds non-integer values (normalised?) and there is no integer layers['counts'] or raw.X; "
            "using X as is", where,
        )
        chosen = ("X (non-integer)", adata.X, adata.var)
    name, matrix, var = chosen
    genes = unique_gene_names(var.index.to_numpy().astype(str), f"{where} var_names")
    id_column = next((c for c in GENE_ID_COLUMNS if c in var.columns), None)
    gene_ids = None if id_column is None else var[id_column].to_numpy().astype(str)
    return _csr(matrix), genes, name, gene_ids


def _csr(matrix: Any) -> sp.csr_matrix:
    return sp.csr_matrix(matrix, dtype=np.float32) if sp.issparse(matrix) else sp.csr_matrix(
        np.asarray(matrix, dtype=np.float32)
    )


def _integer_like(matrix: Any, probe: int = 200_000) -> bool:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix).ravel()
    values = np.asarray(values[:probe], dtype=np.float64)
    return bool(np.isfinite(values).all() and (values == np.round(values)).all())


def _library(adata: Any, library_id: str | None, where: str) -> str | None:
    libraries = list(adata.uns.get("spatial", {}).keys())
    if library_id is not None:
        if library_id not in libraries:
            raise InputError(f"{where}: library_id '{library_id}' not in uns['spatial'] (has {libraries}).")
        return library_id
    if len(libraries) > 1:
        raise InputError(f"{where}: uns['spatial'] holds several libraries {libraries}; pass library_id=...")
    return libraries[0] if libraries else None


def _open_image(
    image: str | Path | RegionReader | None, metadata: dict, h5ad: Path, where: str
) -> tuple[RegionReader, str]:
    if image is None:
        named = [metadata[k] for k in IMAGE_PATH_KEYS if isinstance(metadata.get(k), str)]
        for candidate in named:
            path = Path(candidate) if Path(candidate).is_absolute() else h5ad.parent / candidate
            if path.is_file():
                image = path
                break
        else:
            raise InputError(
                f"{where}: no image given and uns['spatial'][...]['metadata'] names none that exists "
                f"(looked at keys {list(IMAGE_PATH_KEYS)}: {named or 'absent'}). Pass image=PATH (--image)."
            )
    return as_reader(image)


def as_reader(image: str | Path | RegionReader) -> tuple[RegionReader, str]:
    """(reader, path) for an image given as a path or an already open reader."""
    if isinstance(image, (str, Path)):
        return open_image(image), str(image)
    return image, image.path


def anndata_folder(path: Path) -> tuple[Path, Path] | None:
    """(h5ad, image) of a folder holding exactly one ``.h5ad`` and one image file at its top, else None."""
    if not path.is_dir():
        return None
    files = [p for p in path.iterdir() if p.is_file()]
    h5ads = [p for p in files if p.suffix.lower() == ".h5ad"]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    return (h5ads[0], images[0]) if len(h5ads) == 1 and len(images) == 1 else None


class AnnDataReader:
    """One ``.h5ad`` (scanpy/squidpy convention) with its image, or a folder holding exactly one of each."""

    name = "anndata"
    looks_for = "a .h5ad file, or a folder with one .h5ad and one image (anndata)"

    def detect(self, path: Path) -> bool:
        if path.is_file():
            return path.suffix.lower() == ".h5ad"
        return anndata_folder(path) is not None

    def read(self, path: Path, options: ReadOptions) -> list[Sample]:
        image = options.image
        if path.is_dir():
            found = anndata_folder(path)
            if found is None:
                raise InputError(f"{path}: expected exactly one .h5ad and one image file at the top of the folder.")
            path, image = found[0], image if image is not None else found[1]
        return [read_anndata(path, image, options.mpp, samples=options.samples, samples_table=options.samples_table)]
