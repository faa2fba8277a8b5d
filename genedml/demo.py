"""`genedml demo`: the whole chain on synthetic tissue (or a real folder) in a few minutes on a laptop CPU."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from genedml.errors import InputError
from genedml.jsonio import write_json, write_text_atomic
from genedml.threads import threads_for_small_work, torch_threads


METRIC_KEYS = ("pcc_acg", "pcc_heg", "pcc_hvg", "mse", "mae")
SMALL_BACKBONES = ("tiny-cnn", "tiny-vit", "he-stats")


def _make_synthetic(out: Path, small: bool) -> tuple[Path, Path]:
    from genedml.data.synthetic import make_synthetic_dataset, write_synthetic_dataset

    grid = (9, 9) if small else (14, 14)
    samples = make_synthetic_dataset(n_samples=4, n_patients=2, seed=0, grid=grid, n_genes=80)
    folder = write_synthetic_dataset(out / "data", samples)
    return folder, folder / "samples.csv"


def run_demo(
    out: str | Path = "genedml-demo",
    *,
    data: str | Path | None = None,
    backbone: str = "tiny-cnn",
    epochs: int = 30,
    small: bool = False,
    samples_table: str | Path | None = None,
) -> str:
    """Synthetic (or real) data → extract → fit genedml and ridge → predict (regression, retrieval) → evaluate.

    Returns the markdown report (also written to OUT/report.md). With the tiny test backbones every stage
    is small work and runs on one torch thread (see genedml.threads), unless the user chose a count.
    """
    with torch_threads(threads_for_small_work() if backbone in SMALL_BACKBONES else None):
        return _run_demo(Path(out), data, backbone, epochs, small, samples_table)


def _run_demo(out: Path, data: str | Path | None, backbone: str, epochs: int, small: bool, samples_table: str | Path | None) -> str:
    from genedml.data import read_samples
    from genedml.evaluate import evaluate_dir
    from genedml.extract.distributed import run_extraction_distributed
    from genedml.extract.runner import ExtractSettings
    from genedml.fit import FitSettings, fit_model
    from genedml.predict import RetrievalSettings, predict_cache

    from genedml.heads.registry import head_settings

    start = time.perf_counter()
    # A CPU-sized Gene-DML: width 128 instead of the paper's 512, one neighbour and two global transformer
    # blocks with narrow feed-forwards, and 12 optimiser steps per epoch (these keep the test PCC of the
    # paper-sized encoders on the demo, at a sixth of the time).
    heads = {
        "genedml": {"epochs": epochs, "patience": max(10, epochs // 3), "batch_size": 32, "lr": 1e-3, "dim": 128, "groups": 8,
                    "neighbor_depth": 1, "neighbor_mlp_ratio": 1.0, "global_depth": 2, "global_mlp_ratio": 1.0, "min_epoch_steps": 12},
        "ridge": {},
    }
    for model, head in heads.items():
        head_settings(model, head)  # bad values (e.g. --epochs 0) fail before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data, samples_table = _make_synthetic(out, small)
        source = "synthetic tissue (genedml.data.synthetic)"
        # Synthetic spots are 100 µm apart at 1 µm/px: a 112 µm field at 1 µm/px covers one spot.
        settings = ExtractSettings(patch_px=112, mpp_target=1.0, batch_size=64)
        n_genes = 80
    else:
        n_genes = 250
        source = str(data)
        settings = ExtractSettings(batch_size=64)
    read_kwargs = {"samples_table": samples_table} if samples_table else {}
    ids = [s.sample_id for s in read_samples(data, **read_kwargs)]
    if len(ids) < 3:
        raise InputError(f"The demo needs at least 3 samples (train, validation, test); {data} has {ids}.")
    test, val, train = ids[-1], ids[-2], ids[:-2]

    fit_settings = {model: FitSettings(model=model, genes=n_genes, train_samples=train, val_samples=[val], head=head) for model, head in heads.items()}

    cache = out / "cache"
    summary = run_extraction_distributed(
        Path(data), backbone=backbone, weights=None, random_init=True, allow_download=False, cache_dir=cache,
        settings=settings, samples=None, read_kwargs=read_kwargs, progress=False,
    )
    rows: list[tuple[str, dict[str, Any]]] = []
    models = {}
    for model, fs in fit_settings.items():
        result = fit_model(cache, data, out / f"model_{model}", fs, read_kwargs=read_kwargs, overwrite=True)  # the demo's own output
        models[model] = result
    runs = [("genedml (regression)", "genedml", None), ("genedml + retrieval (k=20)", "genedml", RetrievalSettings(k=20)), ("ridge (HEST probe + intercept)", "ridge", None)]
    for label, model, retrieval in runs:
        tag = label.split(" ")[0] + ("_retrieval" if retrieval else "")
        predict_cache(out / f"model_{model}", cache, out / f"pred_{tag}", samples=[test], retrieval=retrieval)
        metrics = evaluate_dir(out / f"pred_{tag}", data, out / f"eval_{tag}", read_kwargs=read_kwargs)
        rows.append((label, metrics["per_slide_mean"]))
    seconds = time.perf_counter() - start
    report = _report(source, backbone, summary or {}, train, val, test, rows, models, seconds, out)
    write_text_atomic(out / "report.md", report)
    write_json(out / "report.json", {"rows": {k: {m: v[m] for m in METRIC_KEYS} for k, v in rows}, "seconds": seconds})
    return report


def _report(source: str, backbone: str, summary: dict, train: list[str], val: str, test: str, rows: list, models: dict, seconds: float, out: Path) -> str:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    table = "| prediction | PCC-ACG | PCC-HEG | PCC-HVG | MSE | MAE |\n|---|---|---|---|---|---|\n" + "\n".join(
        f"| {label} | " + " | ".join(fmt(m[k]) for k in METRIC_KEYS) + " |" for label, m in rows
    )
    return f"""# genedml demo

data: {source}
backbone: {backbone} — weights: random-init (no pretrained knowledge: this demo shows the pipeline, not a biology result)
extraction: {summary.get('spots')} spots, {summary.get('tiles_per_spot')} tiles encoded per spot (local + lattice neighbourhood)
split by sample: train {train}, validation {val}, test {test}
genedml: best epoch {models['genedml'].history.get('best_epoch')}, validation PCC {fmt(models['genedml'].history.get('best_val_pcc'))}

Test sample {test} (PCC per gene, per slide then mean; random-init backbone):

{table}

MSE/MAE on the normalised log1p scale; the ridge probe is HEST's (scaler, PCA 256, ridge) with an intercept, so
its predictions sit at the genes' level like the others. HEG/HVG: the 50 most expressed / most variable panel genes on the training samples.

Figures: {out / 'eval_genedml'}/maps_{test}.png (measured vs predicted), pcc_distribution.png; training curve {out / 'model_genedml'}/curve.png
Predictions (AnnData, open with scanpy): {out / 'pred_genedml'}/{test}.h5ad
Total time: {seconds:.0f}s
"""
