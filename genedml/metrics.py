"""Evaluation metrics (method.md §3): per-gene Pearson, PCC-ACG/HEG/HVG/HPG, MSE, MAE, in two aggregations.

"per_slide_mean": each summary computed within each test slide, then averaged over slides (TRIPLEX /
Gene-DML). "pooled": computed once over the concatenated test spots (HEST-Benchmark). Genes constant in
the truth (or in the prediction) have no Pearson r: they are excluded from the means and counted.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from genedml.errors import InputError

LABELS = {
    "per_slide_mean": "metrics computed within each test slide, then averaged over slides (TRIPLEX/Gene-DML)",
    "pooled": "metrics computed over all test spots concatenated (HEST-Benchmark)",
    "pcc_hpg": "optimistic: the genes are chosen by their PCC on these same test results",
    "excluded": "genes constant in the truth or in the prediction have no PCC; excluded from the means",
}


def _constant(a: np.ndarray) -> np.ndarray:
    """Columns whose values are all equal (exact test: a centred sum of squares can be rounding noise)."""
    return np.ptp(a, axis=0) == 0 if len(a) else np.ones(a.shape[1], dtype=bool)


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of each column (gene) across rows (spots); NaN where truth or prediction is constant."""
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 2:
        raise InputError(
            f"truth and prediction must be (spots, genes) arrays of one shape, got {t.shape} and {p.shape}."
        )
    tc = t - t.mean(axis=0)
    pc = p - p.mean(axis=0)
    denom = np.sqrt((tc * tc).sum(axis=0) * (pc * pc).sum(axis=0))
    valid = ~(_constant(t) | _constant(p)) & (denom > 0)
    r = np.full(t.shape[1], np.nan)
    r[valid] = (tc[:, valid] * pc[:, valid]).sum(axis=0) / denom[valid]
    return np.clip(r, -1.0, 1.0)


def mean_gene_pcc(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    """Mean per-gene Pearson r over the genes that have one (model selection uses the evaluation's r)."""
    return _mean(pearson_per_gene(y_true, y_pred))


def _mean(values: np.ndarray) -> float:
    """Mean over finite values; NaN when there are none (no warning)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _summary(t: np.ndarray, p: np.ndarray, heg: np.ndarray | None, hvg: np.ndarray | None, n_hpg: int) -> dict:
    """All metrics of one set of spots; ``heg``/``hvg`` are column indices."""
    r = pearson_per_gene(t, p)
    const_truth = _constant(t)
    ranked = np.sort(r[np.isfinite(r)])[::-1]
    return {
        "pcc_acg": _mean(r),
        "pcc_heg": _mean(r[heg]) if heg is not None else float("nan"),
        "pcc_hvg": _mean(r[hvg]) if hvg is not None else float("nan"),
        "pcc_hpg": _mean(ranked[:n_hpg]),
        "mse": float(np.mean((t - p) ** 2)),
        "mae": float(np.mean(np.abs(t - p))),
        "n_spots": int(len(t)),
        "n_genes_valid": int(np.isfinite(r).sum()),
        "n_excluded_constant_truth": int(const_truth.sum()),
        "n_excluded_constant_pred": int((~const_truth & _constant(p)).sum()),
        "_r": r,
    }


def _indices(genes: list[str], chosen: Sequence[str] | None, what: str) -> np.ndarray | None:
    """Column indices of ``chosen`` genes; InputError naming those not among ``genes``."""
    if chosen is None:
        return None
    lookup = {g: i for i, g in enumerate(genes)}
    missing = [g for g in chosen if g not in lookup]
    if missing:
        raise InputError(f"{len(missing)} {what} genes are not among the evaluated genes, e.g. {missing[:10]}.")
    return np.array([lookup[g] for g in chosen], dtype=np.int64)


def _json_safe(value: Any) -> Any:
    """Plain Python floats/ints/lists; NaN and inf become None."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def evaluate_predictions(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    slide_ids: Sequence[str],
    genes: Sequence[str],
    heg: Sequence[str] | None,
    hvg: Sequence[str] | None,
    n_hpg: int = 50,
) -> dict:
    """Metrics of predictions against targets, both aggregations, plus a per-gene table; JSON-ready.

    Returns {"labels", "n_spots", "n_genes", "slides", "per_slide_mean": {... , "slides": {id: {...}}},
    "pooled": {...}, "per_gene": {"gene", "pcc_pooled", "pcc_per_slide_mean", "mse", "mae"}}.
    MSE/MAE are means over spots and genes; in "per_slide_mean" they are averaged over slides.
    Excluded-gene counts are per slide in "slides" and summed over slides (gene-slide pairs) above them.
    """
    t = np.asarray(y_true, dtype=np.float64)
    p = np.asarray(y_pred, dtype=np.float64)
    genes = [str(g) for g in genes]
    slide_ids = np.asarray(slide_ids).astype(str)
    if t.shape != p.shape or t.ndim != 2 or t.shape[1] != len(genes) or len(slide_ids) != len(t):
        raise InputError(
            f"shape mismatch: truth {t.shape}, prediction {p.shape}, {len(genes)} genes, {len(slide_ids)} slide ids."
        )
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise InputError("truth or prediction contains NaN/inf; check the targets and the model output.")
    heg_idx, hvg_idx = _indices(genes, heg, "HEG"), _indices(genes, hvg, "HVG")

    pooled = _summary(t, p, heg_idx, hvg_idx, n_hpg)
    slides = list(dict.fromkeys(slide_ids))  # first-appearance order
    per_slide = {s: _summary(t[slide_ids == s], p[slide_ids == s], heg_idx, hvg_idx, n_hpg) for s in slides}
    slide_r = np.stack([per_slide[s].pop("_r") for s in slides])
    pooled_r = pooled.pop("_r")

    averaged = ("pcc_acg", "pcc_heg", "pcc_hvg", "pcc_hpg", "mse", "mae")
    aggregate = {key: _mean([per_slide[s][key] for s in slides]) for key in averaged}
    for key in ("n_excluded_constant_truth", "n_excluded_constant_pred"):
        aggregate[key] = sum(per_slide[s][key] for s in slides)
    aggregate["slides"] = per_slide

    gene_pcc_slides = np.array([_mean(slide_r[:, j]) for j in range(len(genes))])
    result = {
        "labels": LABELS,
        "n_spots": int(len(t)),
        "n_genes": len(genes),
        "n_hpg": int(n_hpg),
        "slides": slides,
        "per_slide_mean": aggregate,
        "pooled": pooled,
        "per_gene": {
            "gene": genes,
            "pcc_pooled": pooled_r,
            "pcc_per_slide_mean": gene_pcc_slides,
            "mse": ((t - p) ** 2).mean(axis=0),
            "mae": np.abs(t - p).mean(axis=0),
        },
    }
    return _json_safe(result)
