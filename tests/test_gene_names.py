"""Duplicated gene symbols (10x matrices, AnnData var_names) become unique as scanpy makes them, with a warning,
and the stable gene ids travel with the Sample."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from anndata.utils import make_index_unique
from PIL import Image

from genedml.data import read_anndata, read_spaceranger
from genedml.data.spots import unique_gene_names

GENES = np.array(["Actb", "Pisd-ps1", "Gfap", "Pisd-ps1", "Actb-1", "Actb", "Pisd-ps1"])
IDS = np.array([f"ENSMUSG{i:011d}" for i in range(len(GENES))])


@pytest.mark.filterwarnings("ignore:Suffix used")  # anndata's own note on Actb-1 already existing
def test_names_match_scanpy_var_names_make_unique(caplog) -> None:
    with caplog.at_level("WARNING", logger="genedml"):
        unique = unique_gene_names(GENES, "here")
    assert list(unique) == list(make_index_unique(pd.Index(GENES)))
    assert list(unique) == ["Actb", "Pisd-ps1", "Gfap", "Pisd-ps1-1", "Actb-1", "Actb-2", "Pisd-ps1-2"]
    assert "2 gene names occur more than once" in caplog.text and "Actb" in caplog.text
    caplog.clear()
    assert list(unique_gene_names(np.array(["A", "B"]), "here")) == ["A", "B"] and not caplog.text


def spaceranger_folder(root: Path) -> Path:
    """A 4-spot Space Ranger folder whose matrix repeats gene names (and holds one antibody feature)."""
    from test_visium_hd import write_10x_h5

    (root / "spatial").mkdir(parents=True)
    barcodes = [f"AAACAAGTATCTCC{i:02d}-1" for i in range(4)]
    pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": [0, 0, 1, 1], "array_col": [0, 2, 1, 3],
                  "pxl_row_in_fullres": [10.0, 10, 30, 30], "pxl_col_in_fullres": [10.0, 30, 20, 40]}).to_csv(
        root / "spatial" / "tissue_positions.csv", index=False)
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps({"spot_diameter_fullres": 110.0}))
    counts = sp.csr_matrix(np.arange(4 * len(GENES)).reshape(4, len(GENES)))
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", np.array(barcodes), GENES, counts, ids=IDS)
    Image.new("RGB", (60, 50), "white").save(root / "image.png")
    return root


@pytest.mark.filterwarnings("ignore:Suffix used")
def test_10x_matrix_with_duplicate_symbols_keeps_all_columns_and_ids(tmp_path: Path, caplog) -> None:
    """Before: Sample kept the duplicated names, and gene ids were dropped."""
    with caplog.at_level("WARNING", logger="genedml"):
        s = read_spaceranger(spaceranger_folder(tmp_path / "S1"))
    assert list(s.genes) == list(make_index_unique(pd.Index(GENES)))
    assert list(s.gene_ids) == list(IDS) and s.counts.shape == (4, len(GENES))
    assert "occur more than once" in caplog.text
    assert list(s.subset([0, 2]).gene_ids) == list(IDS)


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_anndata_with_duplicate_var_names(tmp_path: Path) -> None:
    adata = anndata.AnnData(
        X=sp.csr_matrix(np.ones((3, len(GENES)), np.float32)),
        obs=pd.DataFrame(index=["a", "b", "c"]), var=pd.DataFrame({"gene_ids": IDS}, index=GENES),
    )
    adata.obsm["spatial"] = np.array([[5.0, 5], [10, 10], [20, 15]])
    adata.write_h5ad(tmp_path / "dup.h5ad")
    Image.new("RGB", (30, 30), "white").save(tmp_path / "dup.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # genedml logs; anndata's reader warning is silenced
        s = read_anndata(tmp_path / "dup.h5ad", tmp_path / "dup.png", mpp=1.0)
    assert len(set(s.genes)) == len(GENES) and s.genes[3] == "Pisd-ps1-1"
    assert list(s.gene_ids) == list(IDS)
