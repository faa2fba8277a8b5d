"""`genedml evaluate`: score prediction .h5ad files against measured expression; write metrics and figures."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from genedml.errors import InputError
from genedml.jsonio import write_json
from genedml.metrics import evaluate_predictions
from genedml.model_dir import open_model_dir, read_targets
from genedml.output import model_dir_of
from genedml.targets import TargetSpec, targets_at

N_MAPPED_GENES = 4


def _prediction_files(pred: Path) -> list[Path]:
    files = sorted(pred.glob("*.h5ad")) if pred.is_dir() else [pred]
    if not files or not all(f.is_file() for f in files):
        raise InputError(f"No prediction .h5ad found at {pred} (run `genedml predict` first).")
    return files


def read_prediction(path: Path) -> Any:
    """One prediction file as AnnData; a truncated or foreign file is an InputError naming it."""
    import anndata as ad

    try:
        adata = ad.read_h5ad(path)
    except Exception as exc:  # noqa: BLE001 — h5py/anndata raise OSError, KeyError, ValueError... for damaged files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read prediction file {path} ({reason}); is it truncated? Run `genedml predict` again.") from None
    if "sample_id" not in adata.obs or adata.n_obs == 0 or "spatial" not in adata.obsm:
        raise InputError(f"{path} is not a genedml prediction (no obs['sample_id'] / obsm['spatial']); make it with `genedml predict`.")
    return adata


def _check_one_run(files: list[Path], adatas: list[Any]) -> None:
    """The files of one evaluation must be one model's predictions in one mode, one file per sample. A folder
    that also holds another model's or another mode's files (predict run twice into it) was scored as one
    model, under the first file's provenance, and a sample predicted twice counted twice in the mean."""
    seen: dict[str, Path] = {}
    for path, adata in zip(files, adatas):
        sample_id = str(adata.obs["sample_id"].iloc[0])
        if sample_id in seen:
            raise InputError(f"{seen[sample_id].name} and {path.name} both hold predictions for sample '{sample_id}'; "
                             "evaluate one prediction per sample (move one file away, or pass one file).")
        seen[sample_id] = path

    def run_of(adata: Any) -> tuple[str, str, str]:
        uns = adata.uns.get("genedml", {})
        return str(uns.get("model_dir")), str(uns.get("mode")), str(dict(uns.get("retrieval", {}) or {}))

    first = run_of(adatas[0])
    for path, adata in zip(files[1:], adatas[1:]):
        run = run_of(adata)
        if run != first:
            what = "model" if run[0] != first[0] else "prediction mode (regression, retrieval, blend)"
            raise InputError(f"{files[0].name} and {path.name} come from another {what}: {first[:2]} against "
                             f"{run[:2]}. Put each run's predictions in its own folder and evaluate them apart.")


def score(truth: Sequence[np.ndarray], preds: Sequence[np.ndarray], sample_ids: Sequence[str], spec: TargetSpec) -> dict[str, Any]:
    """Metrics over several slides (per slide then mean, and pooled), with the model's HEG/HVG lists."""
    slide = np.concatenate([np.full(len(t), s) for t, s in zip(truth, sample_ids)])
    return evaluate_predictions(np.concatenate(truth), np.concatenate(preds), slide, spec.panel, spec.heg, spec.hvg)


def evaluate_dir(
    pred: str | Path, data: str | Path, out: str | Path, *, model_dir: str | Path | None = None, read_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Evaluate every prediction file under `pred`; writes metrics.json, per_gene.csv and PNG figures to `out`."""
    from genedml.data import read_samples
    from genedml.plots import pcc_distribution, spatial_maps

    files = _prediction_files(Path(pred))
    adatas = [read_prediction(f) for f in files]
    _check_one_run(files, adatas)
    provenance = dict(adatas[0].uns.get("genedml", {}))
    model_dir, _ = open_model_dir(Path(model_dir) if model_dir else model_dir_of(files[0], provenance))
    spec = read_targets(model_dir)
    ids = [str(a.obs["sample_id"].iloc[0]) for a in adatas]
    samples = {s.sample_id: s for s in read_samples(data, samples=ids, **{k: v for k, v in (read_kwargs or {}).items() if v is not None})}
    truth, preds = [], []
    for sample_id, adata in zip(ids, adatas):
        if list(adata.var_names) != spec.panel:
            raise InputError(f"Predictions for '{sample_id}' are not on the model's gene panel ({model_dir}).")
        truth.append(targets_at(samples[sample_id], np.asarray(adata.obs_names), spec))
        preds.append(np.asarray(adata.X, dtype=np.float32))
    metrics = score(truth, preds, ids, spec)
    note = provenance.get("note") or None
    summary = {
        "samples": ids,
        "mode": provenance.get("mode"),
        "weights": provenance.get("weights"),
        **{f"{agg}/{k}": metrics[agg][k] for agg in ("per_slide_mean", "pooled") for k in ("pcc_acg", "pcc_heg", "pcc_hvg", "pcc_hpg", "mse", "mae")},
    }
    if note:
        summary["note"] = note
    metrics["summary"] = summary
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    _write_per_gene(out / "per_gene.csv", metrics["per_gene"])
    pcc = np.array([np.nan if v is None else v for v in metrics["per_gene"]["pcc_pooled"]], dtype=float)
    pcc_distribution(pcc, out / "pcc_distribution.png", label="PCC per gene (pooled test spots)", note=note)
    order = np.argsort(np.nan_to_num(pcc, nan=-2))[::-1][:N_MAPPED_GENES]
    genes = [spec.panel[i] for i in order]
    for sample_id, t, p, adata in zip(ids, truth, preds, adatas):
        spatial_maps(np.asarray(adata.obsm["spatial"]), t[:, order], p[:, order], genes, out / f"maps_{sample_id}.png", title=f"{sample_id}: measured vs predicted", note=note)
    return metrics


def _write_per_gene(path: Path, table: dict[str, list[Any]]) -> None:
    keys = list(table)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(keys)
        writer.writerows(zip(*(table[k] for k in keys)))
