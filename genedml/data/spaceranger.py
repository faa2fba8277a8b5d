"""10x Space Ranger output folder: ``spatial/tissue_positions*.csv|parquet``, ``spatial/scalefactors_json.json``,
``filtered_feature_bc_matrix.h5`` and the full-resolution image the run was made with."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from genedml.data.anndata_reader import as_reader
from genedml.data.formats import IMAGE_SUFFIXES
from genedml.data.image import RegionReader
from genedml.data.reader import ReadOptions
from genedml.data.sample import Sample
from genedml.data.samples_table import load_samples_table, resolve_mpp, resolve_patient, select_ids
from genedml.data.spots import check_not_empty, check_unique, join_counts, unique_gene_names
from genedml.data.visium import fullres_mpp, image_scale
from genedml.errors import InputError

POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
POSITION_FILES = ("tissue_positions.csv", "tissue_positions_list.csv", "tissue_positions.parquet")
MATRIX_FILES = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5")


def spaceranger_root(path: str | Path) -> Path | None:
    """The folder holding ``spatial/`` and the matrix: `path` itself or its ``outs/``; None if neither."""
    for root in (Path(path), Path(path) / "outs"):
        has_positions = any((root / "spatial" / name).is_file() for name in POSITION_FILES)
        if has_positions and any((root / name).is_file() for name in MATRIX_FILES):
            return root
    return None


def read_spaceranger(
    folder: str | Path,
    image: str | Path | RegionReader | None = None,
    mpp: float | None = None,
    *,
    sample_id: str | None = None,
    samples: Iterable[str] | str | None = None,
    samples_table=None,
    image_dirs: Sequence[Path] = (),
    source: str = "spaceranger",
) -> Sample:
    """One sample from a Space Ranger output: in-tissue spots with counts, centres in `image` pixels.

    `image` is the full-resolution image (or ``spatial/tissue_hires_image.png``, then coordinates and mpp are
    scaled by ``tissue_hires_scalef``); when omitted, the one image file at the top of `folder` (else of the
    first of `image_dirs` holding image files) is used. µm/px comes from ``scalefactors_json.json``.
    """
    folder = Path(folder)
    root = spaceranger_root(folder)
    if root is None:
        raise InputError(
            f"{folder}: not a Space Ranger output (looked for spatial/{{{','.join(POSITION_FILES)}}} and "
            f"{' or '.join(MATRIX_FILES)}, also under outs/)."
        )
    sample_id = sample_id or (folder.parent.name if folder.name == "outs" else folder.name)
    select_ids([sample_id], samples, str(folder))
    where = f"sample '{sample_id}' ({root})"

    positions, positions_path = read_positions(root / "spatial")
    positions = positions[positions["in_tissue"].astype(int) == 1].reset_index(drop=True)
    barcodes = positions["barcode"].to_numpy().astype(str)
    check_unique(barcodes, str(positions_path))
    check_not_empty(len(barcodes), str(positions_path), "no spot has in_tissue == 1")
    matrix_path = next(root / name for name in MATRIX_FILES if (root / name).is_file())
    count_barcodes, genes, counts, gene_ids = read_10x_h5(matrix_path)
    keep, counts = join_counts(barcodes, count_barcodes, counts, f"{where}: {matrix_path.name}")
    positions, barcodes = positions[keep], barcodes[keep]

    scalefactors = _read_scalefactors(root / "spatial" / "scalefactors_json.json")
    reader, image_path = _open_image(image, [root, *image_dirs], where)
    scale, resolution = image_scale(image_path, (reader.width, reader.height), scalefactors, None, where)
    mpp_file, how = fullres_mpp(scalefactors, where)
    table = load_samples_table(samples_table)
    resolved = resolve_mpp(
        sample_id, where, given=mpp, table=table, from_file=None if mpp_file is None else mpp_file / scale,
        how=f"spatial/scalefactors_json.json: {how}",
    )
    patient, known = resolve_patient(sample_id, table)
    return Sample(
        sample_id=sample_id, patient_id=patient, mpp=resolved, barcodes=barcodes,
        centers=positions[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64) * scale,
        image=reader, counts=counts, genes=genes, gene_ids=gene_ids,
        array_coords=positions[["array_col", "array_row"]].to_numpy(np.int64),
        source=source, patient_known=known,
        meta={"path": str(root), "image": image_path, "positions": str(positions_path),
              "matrix": str(matrix_path), "image_resolution": resolution, "coordinate_scale": scale},
    )


def read_positions(spatial: Path) -> tuple[pd.DataFrame, Path]:
    """The spot table in any of its three Space Ranger forms, with the standard column names."""
    for name in POSITION_FILES:
        path = spatial / name
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            with path.open() as handle:
                has_header = handle.readline().startswith("barcode")
            table = pd.read_csv(path, header=0 if has_header else None)
            if not has_header:
                table.columns = POSITION_COLUMNS[: table.shape[1]]
        missing = [c for c in POSITION_COLUMNS if c not in table.columns]
        if missing:
            raise InputError(f"{path}: missing columns {missing}; expected {POSITION_COLUMNS}.")
        return table[POSITION_COLUMNS], path
    raise InputError(f"{spatial}: no spot positions (looked for {', '.join(POSITION_FILES)}).")


def read_10x_h5(path: Path) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix, np.ndarray | None]:
    """(barcodes, unique gene names, spots × genes float32 CSR, gene ids) from a 10x feature-barcode HDF5 matrix.

    Only "Gene Expression" features are kept. Duplicated gene names are made unique (GENE, GENE-1 …) as scanpy
    does; the ids (``features/id``, Ensembl) are returned beside them, None when the file has none.
    """
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            group = h5["matrix"]
            n_features, n_barcodes = (int(v) for v in group["shape"][:])
            # 10x stores features × barcodes in CSC, i.e. barcodes × features in CSR
            counts = sp.csr_matrix(
                (group["data"][:].astype(np.float32), group["indices"][:], group["indptr"][:]),
                shape=(n_barcodes, n_features),
            )
            barcodes = group["barcodes"][:].astype(str)
            features = group["features"]
            genes = features["name"][:].astype(str)
            gene_ids = features["id"][:].astype(str) if "id" in features else None
            types = features["feature_type"][:].astype(str) if "feature_type" in features else None
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(
            f"Cannot read 10x matrix {path}: {exc}. Expected matrix/{{data,indices,indptr,shape,barcodes,"
            "features/name}."
        ) from exc
    if types is not None and (types != "Gene Expression").any():
        expression = types == "Gene Expression"
        counts, genes = counts[:, expression], genes[expression]
        gene_ids = None if gene_ids is None else gene_ids[expression]
    return barcodes, unique_gene_names(genes, str(path)), counts, gene_ids


def _read_scalefactors(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"Cannot parse {path}: {exc}.") from exc


def _open_image(image: str | Path | RegionReader | None, roots: Sequence[Path], where: str) -> tuple[RegionReader, str]:
    if image is None:
        searched: list[str] = []
        for root in roots:
            found = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            searched.append(str(root))
            if found:
                break
        if len(found) != 1:
            raise InputError(
                f"{where}: pass the full-resolution image with image=PATH (--image); found {len(found)} image "
                f"files ({[p.name for p in found]}) at the top of {' or '.join(searched)}."
            )
        image = found[0]
    return as_reader(image)


class SpaceRangerReader:
    """A Space Ranger output folder (or its parent holding ``outs/``); one sample."""

    name = "spaceranger"
    looks_for = "spatial/tissue_positions*.csv|parquet + filtered_feature_bc_matrix.h5, also under outs/ (spaceranger)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and spaceranger_root(path) is not None

    def read(self, path: Path, options: ReadOptions) -> list[Sample]:
        return [read_spaceranger(path, options.image, options.mpp, samples=options.samples, samples_table=options.samples_table)]
