"""SpatialData stores: tiny Visium- and Visium-HD-shaped SpatialData objects built and written here, read back as
Samples (spots placed in the chosen image's pixels, µm/px from the spot or bin size). Skipped without the
optional `spatialdata` package (pip install 'genedml[spatialdata]')."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genedml.data import detect_format, inspect_samples, read_samples
from genedml.errors import InputError

needs_spatialdata = pytest.mark.skipif(
    importlib.util.find_spec("spatialdata") is None, reason="spatialdata not installed (pip install 'genedml[spatialdata]')"
)
pytestmark = pytest.mark.filterwarnings("ignore")  # spatialdata/dask/xarray deprecation chatter
HIRES = 0.25
RADIUS = 20.0  # full-res px: 55 µm spots -> 55 / 40 = 1.375 µm/px


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 300, 400), dtype=np.uint8)


def spot_table(barcodes: list[str], region: str, instance: np.ndarray, genes: list[str]):
    import anndata
    from spatialdata.models import TableModel

    rng = np.random.default_rng(len(barcodes))
    obs = pd.DataFrame({"spot_id": instance, "region": pd.Categorical([region] * len(barcodes)),
                        "array_row": np.arange(len(barcodes)), "array_col": 2 * np.arange(len(barcodes))},
                       index=barcodes)
    var = pd.DataFrame({"gene_ids": [f"ENSMUSG{i:011d}" for i in range(len(genes))]}, index=genes)
    adata = anndata.AnnData(X=rng.poisson(3.0, (len(barcodes), len(genes))).astype(np.float32), obs=obs, var=var)
    return TableModel.parse(adata, region=region, region_key="region", instance_key="spot_id")


@pytest.fixture(scope="module")
def visium_store(tmp_path_factory, pixels: np.ndarray) -> Path:
    """What spatialdata_io.visium writes: shapes '<id>' (circles, full-res px), '<id>_full_image' (multiscale),
    '<id>_hires_image' (scaled), table 'table' annotating '<id>'."""
    import spatialdata as sd
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Identity, Scale
    from xarray import DataArray

    hires = Scale([HIRES, HIRES], axes=("y", "x"))
    images = {
        "V1_full_image": Image2DModel.parse(DataArray(pixels, dims=("c", "y", "x")), scale_factors=[2],
                                            transformations={"V1": Identity()}, rgb=None),
        "V1_hires_image": Image2DModel.parse(DataArray(pixels[:, ::4, ::4], dims=("c", "y", "x")),
                                             transformations={"V1": hires.inverse()}, rgb=None),
    }
    coords = np.array([[50.0, 60.0], [120.0, 80.0], [200.0, 150.0], [390.0, 290.0]])
    shapes = {"V1": ShapesModel.parse(coords, geometry=0, radius=np.full(4, RADIUS), index=np.arange(4),
                                      transformations={"V1": Identity()})}
    barcodes = ["AAACAAGTATCTCCCA-1", "AAACACCAATAACTGC-1", "AAACAGAGCGACTCCT-1", "AAACAGCTTTCAGAAG-1"]
    table = spot_table(barcodes, "V1", np.arange(4), ["Actb", "Gfap", "Mbp"])
    sdata = sd.SpatialData(images=images, shapes=shapes, tables={"table": table})
    sdata.attrs["spatialdata_io_reader"] = "visium"
    path = tmp_path_factory.mktemp("sdata") / "visium.zarr"
    sdata.write(path)
    return path


@needs_spatialdata
def test_visium_store_reads_spots_in_full_image_pixels(visium_store: Path, pixels: np.ndarray) -> None:
    assert detect_format(visium_store) == "spatialdata"
    [s] = read_samples(visium_store)
    assert s.sample_id == "V1" and s.source == "spatialdata" and s.n_spots == 4 and list(s.genes) == ["Actb", "Gfap", "Mbp"]
    assert s.barcodes[0] == "AAACAAGTATCTCCCA-1" and s.gene_ids[0] == "ENSMUSG00000000000"
    np.testing.assert_allclose(s.centers, [[50, 60], [120, 80], [200, 150], [390, 290]])
    assert s.mpp == pytest.approx(55.0 / (2 * RADIUS))
    assert (s.image.width, s.image.height) == (400, 300) and s.meta["image"].endswith("V1_full_image")
    region = s.image.read_region(380, 280, 40, 40)
    assert region.inside == (0, 0, 20, 20) and (region.pixels[20:] == 255).all()
    np.testing.assert_array_equal(region.pixels[:20, :20], np.moveaxis(pixels, 0, -1)[280:300, 380:400])
    [row] = inspect_samples(visium_store)
    assert row["format"] == "spatialdata" and row["spots"] == 4 and row["image"]["width"] == 400


@needs_spatialdata
def test_named_hires_image_scales_coordinates_and_mpp(visium_store: Path) -> None:
    [s] = read_samples(visium_store, image="V1_hires_image")
    np.testing.assert_allclose(s.centers[0], [50 * HIRES, 60 * HIRES])
    assert s.mpp == pytest.approx(55.0 / (2 * RADIUS) / HIRES) and s.image.width == 100
    with pytest.raises(InputError, match="image element 'nope' not found"):
        read_samples(visium_store, image="nope")


@needs_spatialdata
def test_visium_hd_store_one_bin_size_per_run(tmp_path: Path, pixels: np.ndarray) -> None:
    """What spatialdata_io.visium_hd writes: squares '<id>_square_NNNum' annotated by tables 'square_NNNum'."""
    import spatialdata as sd
    from geopandas import GeoDataFrame
    from shapely.geometry import box
    from spatialdata.models import Image2DModel, ShapesModel
    from spatialdata.transformations import Identity
    from xarray import DataArray

    mpp = 0.5
    shapes, tables = {}, {}
    for bin_um in (8, 16):
        side = bin_um / mpp
        centres = [(side * (i + 0.5), side * 2.5) for i in range(5)]
        squares = GeoDataFrame(geometry=[box(x - side / 2, y - side / 2, x + side / 2, y + side / 2) for x, y in centres])
        name = f"HD1_square_{bin_um:03d}um"
        shapes[name] = ShapesModel.parse(squares, transformations={"HD1": Identity()})
        barcodes = [f"s_{bin_um:03d}um_00002_{i:05d}-1" for i in range(5)]
        tables[f"square_{bin_um:03d}um"] = spot_table(barcodes, name, np.arange(5), ["A", "B"])
    image = Image2DModel.parse(DataArray(pixels, dims=("c", "y", "x")), transformations={"HD1": Identity()}, rgb=None)
    sdata = sd.SpatialData(images={"HD1_full_image": image}, shapes=shapes, tables=tables)
    sdata.attrs["spatialdata_io_reader"] = "visium_hd"
    sdata.write(tmp_path / "hd.zarr")

    [s] = read_samples(tmp_path / "hd.zarr")
    assert s.sample_id == "HD1" and s.meta["bin_size_um"] == 8 and s.barcodes[0].startswith("s_008um")
    assert s.mpp == pytest.approx(mpp)
    np.testing.assert_allclose(s.centers[1], [24.0, 40.0])
    [big] = read_samples(tmp_path / "hd.zarr", bin_size_um=16)
    assert big.meta["bin_size_um"] == 16 and big.mpp == pytest.approx(mpp)
    with pytest.raises(InputError, match="available bin sizes: \\[8, 16\\]"):
        read_samples(tmp_path / "hd.zarr", bin_size_um=2)


def test_missing_spatialdata_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "x.zarr"
    for sub in ("tables", "shapes"):
        (store / sub).mkdir(parents=True)
    (store / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    assert detect_format(store) == "spatialdata"
    monkeypatch.setitem(sys.modules, "spatialdata", None)
    with pytest.raises(InputError, match=r"pip install 'genedml\[spatialdata\]'"):
        read_samples(store)
