"""SpatialData ``.zarr`` stores (written by ``spatialdata`` / ``spatialdata-io``: Visium, Visium HD, Xenium) through
the optional extra ``genedml[spatialdata]``.

Each region a table annotates (a shapes element: Visium spots as circles, Visium HD bins as squares) is one
sample; its spots are the table rows of that region, placed by the shapes' centroids, mapped into the pixels of
an image element through a coordinate system both share. The image is the largest one in that coordinate
system (or the element named by ``image=``), read lazily through dask. µm/px comes from the spot size: Visium
circles are 55 µm across, Visium HD squares are the bin size named in the region (``…_square_008um``); for
other platforms (Xenium) pass ``mpp``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from genedml.data.anndata_reader import choose_counts, spot_diameter_um
from genedml.data.image import Region, _as_rgb, padded_region
from genedml.data.reader import ReadOptions
from genedml.data.sample import Sample
from genedml.data.samples_table import load_samples_table, resolve_mpp, resolve_patient, select_ids
from genedml.data.spots import check_unique
from genedml.data.visium import VISIUM_SPOT_UM
from genedml.errors import InputError
from genedml.log import log

INSTALL_HINT = "pip install 'genedml[spatialdata]'"
DEFAULT_BIN_UM = 8
_BIN_REGION = re.compile(r"^(?P<run>.*?)_?square_(?P<um>\d+)um$")


def import_spatialdata(path: str = "") -> Any:
    """The ``spatialdata`` module, or an InputError that says how to install it."""
    try:
        import spatialdata
    except ImportError as exc:
        raise InputError(
            f"{path}: SpatialData stores are read through the spatialdata package, which is not installed "
            f"({exc}). Install it with {INSTALL_HINT}."
        ) from exc
    return spatialdata


def is_spatialdata(path: Path) -> bool:
    """A zarr group with SpatialData's element folders (``tables/`` and ``shapes/``)."""
    has_group = (path / "zarr.json").is_file() or (path / ".zgroup").is_file()
    return path.is_dir() and has_group and (path / "tables").is_dir() and (path / "shapes").is_dir()


class SpatialDataImage:
    """One image element of a SpatialData store (level 0 of a multiscale image), read region by region."""

    def __init__(self, element: Any, path: str) -> None:
        array = element["scale0"]["image"] if hasattr(element, "children") else element  # DataTree or DataArray
        if tuple(array.dims) != ("c", "y", "x"):
            raise InputError(f"{path}: expected a (c, y, x) image, got dims {tuple(array.dims)}.")
        self.path = path
        self._data = array.data
        self.height, self.width = int(array.sizes["y"]), int(array.sizes["x"])

    def _fetch(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        block = self._data[:, y0:y1, x0:x1]
        if hasattr(block, "compute"):
            block = block.compute(scheduler="synchronous")  # the patch readers already run in threads
        return _as_rgb(np.moveaxis(np.asarray(block), 0, -1), self.path)

    def read_region(self, x: int, y: int, w: int, h: int) -> Region:
        return padded_region(x, y, w, h, self.width, self.height, self._fetch)

    def release(self) -> None:
        """Nothing to drop: chunks are read on demand."""


def read_spatialdata(
    path: str | Path,
    image: str | None = None,
    mpp: float | None = None,
    *,
    bin_size_um: float | None = None,
    samples: Iterable[str] | str | None = None,
    samples_table=None,
) -> list[Sample]:
    """One sample per annotated region of a SpatialData store (one bin size for Visium HD: 8 µm by default)."""
    path = Path(path)
    sdata = import_spatialdata(str(path)).read_zarr(path)
    regions = _annotated_regions(sdata, bin_size_um, path)
    ids = list(dict.fromkeys(sample_id for sample_id, *_ in regions))
    table = load_samples_table(samples_table)
    chosen = set(select_ids(ids, samples, str(path)))
    return [
        _read_region(sdata, path, sample_id, table_name, region, image, mpp, table, bin_um)
        for sample_id, table_name, region, bin_um in regions
        if sample_id in chosen
    ]


def _annotated_regions(sdata: Any, bin_size_um: float | None, path: Path) -> list[tuple[str, str, str, int | None]]:
    """(sample id, table, region, bin size or None) for every shapes region a table annotates."""
    found = []
    for table_name, tbl in sdata.tables.items():
        attrs = tbl.uns.get("spatialdata_attrs", {})
        regions = attrs.get("region")
        for region in [regions] if isinstance(regions, str) else list(regions or []):
            if region not in sdata.shapes:
                log.info("%s: table '%s' annotates '%s', which is not a shapes element; skipped", path, table_name, region)
                continue
            match = _BIN_REGION.match(region)
            run = (match.group("run") or path.stem) if match else region
            found.append((run, table_name, region, int(match.group("um")) if match else None))
    if not found:
        raise InputError(f"{path}: no table annotates a shapes element (spots); nothing to read as samples.")
    bins = sorted({b for *_, b in found if b is not None})
    if bins:
        size = DEFAULT_BIN_UM if bin_size_um is None else int(bin_size_um)
        if size not in bins:
            raise InputError(f"{path}: no {size} µm bins; available bin sizes: {bins} µm. Choose one with bin_size_um=...")
        found = [f for f in found if f[3] in (None, size)]
    elif bin_size_um is not None:
        raise InputError(f"{path}: bin_size_um={bin_size_um:g} given but the store holds no square bins.")
    return found


def _read_region(sdata: Any, path: Path, sample_id: str, table_name: str, region: str, image: str | None,
                 mpp: float | None, table, bin_um: int | None) -> Sample:
    from spatialdata.transformations import get_transformation

    where = f"sample '{sample_id}' ({path}, region '{region}')"
    tbl = sdata.tables[table_name]
    attrs = tbl.uns["spatialdata_attrs"]
    rows = tbl[(tbl.obs[attrs["region_key"]] == region).to_numpy()]
    shapes = sdata.shapes[region]
    instances = rows.obs[attrs["instance_key"]].to_numpy()
    missing = ~np.isin(instances, shapes.index.to_numpy())
    if missing.any():
        raise InputError(f"{where}: {int(missing.sum())} table rows have no shape, e.g. {instances[missing][:5].tolist()}.")
    geometry = shapes.loc[instances]

    image_name, system = _choose_image(sdata, region, image, where)
    to_system = get_transformation(shapes, to_coordinate_system=system)
    image_to_system = get_transformation(sdata.images[image_name], to_coordinate_system=system)
    axes = ("x", "y")
    affine = np.linalg.inv(image_to_system.to_affine_matrix(axes, axes)) @ to_system.to_affine_matrix(axes, axes)
    centroids = geometry.geometry.centroid
    points = np.column_stack([centroids.x.to_numpy(), centroids.y.to_numpy(), np.ones(len(geometry))])
    centers = (affine @ points.T).T[:, :2]
    scale = float(np.sqrt(abs(np.linalg.det(affine[:2, :2]))))  # shape units -> image pixels

    reader = SpatialDataImage(sdata.images[image_name], f"{path}::images/{image_name}")
    overridden = mpp is not None or (sample_id in table and table[sample_id].mpp is not None)
    from_file, how = (None, "") if overridden else _spot_mpp(sdata, rows, geometry, scale, bin_um, where)
    barcodes = rows.obs_names.to_numpy().astype(str)
    check_unique(barcodes, where, "table obs_names")
    counts, genes, counts_source, gene_ids = choose_counts(rows, where)
    array_coords = None
    if {"array_row", "array_col"} <= set(rows.obs.columns):
        array_coords = rows.obs[["array_col", "array_row"]].to_numpy(np.int64)
    patient, known = resolve_patient(sample_id, table)
    return Sample(
        sample_id=sample_id, patient_id=patient, barcodes=barcodes, centers=centers, image=reader,
        mpp=resolve_mpp(sample_id, where, given=mpp, table=table, from_file=from_file, how=how or "the spot size"),
        counts=counts, genes=genes, gene_ids=gene_ids, array_coords=array_coords, source="spatialdata",
        patient_known=known,
        meta={"path": str(path), "table": table_name, "region": region, "image": reader.path,
              "coordinate_system": system, "counts_source": counts_source, "bin_size_um": bin_um},
    )


def _choose_image(sdata: Any, region: str, image: str | None, where: str) -> tuple[str, str]:
    """(image element, coordinate system it shares with the region): `image` if named, else the largest."""
    from spatialdata.transformations import get_transformation

    systems = list(get_transformation(sdata.shapes[region], get_all=True))
    candidates = []
    for name, element in sdata.images.items():
        shared = [s for s in systems if s in get_transformation(element, get_all=True)]
        if shared:
            level0 = element["scale0"]["image"] if hasattr(element, "children") else element
            candidates.append((int(level0.sizes["y"]) * int(level0.sizes["x"]), name, shared[0]))
    if image is not None:
        match = [(name, system) for _, name, system in candidates if name == image]
        if not match:
            raise InputError(
                f"{where}: image element '{image}' not found in a coordinate system of the region; images there: "
                f"{[name for _, name, _ in candidates]}."
            )
        return match[0]
    if not candidates:
        raise InputError(f"{where}: no image element shares a coordinate system ({systems}) with the region.")
    _, name, system = max(candidates)
    if len(candidates) > 1:
        log.info("%s: using image '%s' (the largest of %s); pass image=NAME for another", where, name,
                 [n for _, n, _ in candidates])
    return name, system


def _spot_mpp(sdata: Any, rows: Any, geometry: Any, scale: float, bin_um: int | None, where: str) -> tuple[float | None, str]:
    """µm/px of the image from the spot size: circle diameter (Visium) or square side (Visium HD bins)."""
    if bin_um is not None:
        minx, _, maxx, _ = geometry.geometry.iloc[0].bounds
        side = (maxx - minx) if maxx > minx else 2 * float(geometry["radius"].iloc[0])
        return bin_um / (side * scale), f"the {bin_um} µm bin size over the bin's width in pixels"
    if "radius" not in geometry.columns:
        return None, "the spot size (the shapes are not circles)"
    reader = str(sdata.attrs.get("spatialdata_io_reader", ""))
    if reader == "visium":
        spot_um = VISIUM_SPOT_UM
    elif reader:
        return None, f"the spot size (a {reader} store has no fixed spot size)"
    else:
        spot_um = spot_diameter_um(rows, {}, where)
    diameter = 2 * float(np.median(geometry["radius"].to_numpy())) * scale
    return spot_um / diameter, f"{spot_um:g} µm spots over their diameter in pixels"


class SpatialDataReader:
    """A SpatialData ``.zarr`` store; one sample per annotated shapes region."""

    name = "spatialdata"
    looks_for = "a SpatialData .zarr store with tables/ and shapes/ (spatialdata)"

    def detect(self, path: Path) -> bool:
        return is_spatialdata(path)

    def read(self, path: Path, options: ReadOptions) -> list[Sample]:
        image = options.image
        if image is not None and not isinstance(image, (str, Path)):
            raise InputError(f"{path}: for a SpatialData store, image= names an image element (a string).")
        image = None if image is None else str(image)  # --image NAME arrives as a Path
        return read_spatialdata(
            path, image, options.mpp, bin_size_um=options.bin_size_um, samples=options.samples,
            samples_table=options.samples_table,
        )

