"""Prediction outputs: one AnnData (.h5ad) per sample that scanpy and squidpy open as they are.

`X` = prediction on the model's gene panel, `obs_names` = barcodes, `obsm['spatial']` = spot centres in
level-0 pixels, retrieval neighbours in `obsm`, provenance in `uns['genedml']`. Written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np


def write_prediction(path: Path, sample_id: str, barcodes: np.ndarray, centers: np.ndarray, genes: Sequence[str], pred: dict[str, Any], provenance: dict[str, Any]) -> Path:
    """One AnnData per sample: X = prediction, obs_names = barcodes, obsm['spatial'] = centres."""
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame(index=pd.Index(np.asarray(barcodes).astype(str), name="barcode"))
    obs["sample_id"] = sample_id
    if "group" in pred:
        obs["genedml_group"] = pd.Categorical(pred["group"].astype(str))
    adata = ad.AnnData(X=np.asarray(pred["X"], dtype=np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(list(genes), name="gene")))
    adata.obsm["spatial"] = np.asarray(centers, dtype=np.float64)
    if "knn_index" in pred:
        adata.obsm["knn_index"] = np.asarray(pred["knn_index"], dtype=np.int64)
        adata.obsm["knn_similarity"] = np.asarray(pred["knn_similarity"], dtype=np.float32)
    adata.uns["genedml"] = _h5_safe(provenance | {"sample_id": sample_id})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    tmp.replace(path)
    return path


def _h5_safe(value: Any) -> Any:
    """anndata's uns writer rejects None: drop None entries, recurse into dicts."""
    if isinstance(value, dict):
        return {k: _h5_safe(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_h5_safe(v) for v in value if v is not None]
    return value
