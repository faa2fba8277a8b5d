"""`genedml bench hest`: the HEST-Benchmark protocol on HEST's benchmark folder, features from a genedml cache.

The folder is the one HEST downloads (`MahmoodLab/hest-bench`; read by HEST's `src/hest/bench/benchmark.py`):

    BENCH_DIR/<TASK>/splits/train_<i>.csv, test_<i>.csv   columns sample_id, patches_path, expr_path
    BENCH_DIR/<TASK>/var_50genes.json                       {"genes": [...]}
    BENCH_DIR/<TASK>/adata/<sample_id>.h5ad                 counts; obs_names = spot barcodes
    BENCH_DIR/<TASK>/patches/<sample_id>.h5                 img, barcode, coords: HEST's spots

(BENCH_DIR may also be one task folder.) Per split, as HEST does: the spots are those of the patch files
(joined to the cache by barcode), targets are log1p of the counts of the listed genes (no library-size
normalisation), and the metric is the Pearson r of each gene over the concatenated test spots, averaged over
genes; a task's score is the mean ± std (population std, numpy's default as in HEST) over its splits, and the
leaderboard's average is the mean over tasks. HEST's probe is the `ridge` head (StandardScaler → PCA 256 →
Ridge α = 100/(P·G), no intercept; solved in closed form where HEST runs lsqr for ≤ 1000 iterations); every
other head runs on the same splits and spots. Neural heads select their epoch on a validation section carved
from the training sections, never the test split.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from genedml.cache.store import FeatureCache
from genedml.errors import CacheMismatchError, InputError
from genedml.fit import split_samples
from genedml.heads.features import SpotFeatures
from genedml.jsonio import write_json, write_text_atomic
from genedml.log import log
from genedml.metrics import pearson_per_gene
from genedml.spots import load_spot_features

# The leaderboard's tasks in its column order (folder name → column name in HEST's README).
HEST_TASKS = {"IDC": "IDC", "PRAD": "PRAD", "PAAD": "PAAD", "SKCM": "SKCM", "COAD": "COAD", "READ": "READ",
              "CCRCC": "ccRCC", "LUNG": "LUAD", "LYMPH_IDC": "LYMPH IDC"}
HEST_PATCH_PX, HEST_MPP = 224, 0.5  # HEST's patches: 224 px at 0.5 µm/px (112 µm)
HEST_GENE_LIST = "var_50genes.json"
NEURAL_HEADS = {"genedml", "triplex", "bleep"}
HEST_PROBE = {"fit_intercept": False}  # HEST's Ridge has no intercept (the same PCC; predictions centred on 0)


@dataclass
class HestBenchSettings:
    """What to run: heads, tasks, the gene list file, and the shared head settings (neural heads only)."""

    models: list[str] = field(default_factory=lambda: ["ridge"])
    tasks: list[str] | None = None
    gene_list: str = HEST_GENE_LIST
    backbone: str | None = None
    seed: int = 1  # HEST's BenchmarkConfig default
    epochs: int = 200
    val_fraction: float = 0.2
    head: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SplitSample:
    """One row of a HEST split file."""

    sample_id: str
    patches_path: str
    expr_path: str


@dataclass(frozen=True)
class Split:
    index: int
    train: tuple[SplitSample, ...]
    test: tuple[SplitSample, ...]


def find_tasks(bench_dir: str | Path, only: Sequence[str] | None = None) -> list[Path]:
    """Task folders under `bench_dir` (folders with `splits/`), or `bench_dir` itself when it is one."""
    bench_dir = Path(bench_dir)
    if not bench_dir.is_dir():
        raise InputError(f"HEST benchmark folder not found: {bench_dir}.")
    if (bench_dir / "splits").is_dir():
        tasks = [bench_dir]
    else:
        tasks = sorted((p for p in bench_dir.iterdir() if (p / "splits").is_dir()), key=_task_order)
    if only:
        unknown = sorted(set(only) - {t.name for t in tasks})
        if unknown:
            raise InputError(f"--task {unknown} not found in {bench_dir} (tasks: {[t.name for t in tasks]}).")
        tasks = [t for t in tasks if t.name in only]
    if not tasks:
        raise InputError(
            f"{bench_dir} holds no HEST benchmark task: expected <TASK>/splits/train_0.csv, test_0.csv, "
            f"{HEST_GENE_LIST}, adata/ and patches/ (the MahmoodLab/hest-bench layout)."
        )
    return tasks


def _task_order(path: Path) -> tuple[int, str]:
    order = list(HEST_TASKS)
    name = path.name.upper()
    return (order.index(name) if name in order else len(order), path.name)


def read_splits(task_dir: Path) -> list[Split]:
    """`splits/train_<i>.csv` and `test_<i>.csv` for i = 0, 1, … (both files must exist for each i)."""
    import pandas as pd

    split_dir = task_dir / "splits"
    splits = []
    while (split_dir / f"train_{len(splits)}.csv").is_file() or (split_dir / f"test_{len(splits)}.csv").is_file():
        i = len(splits)
        rows = []
        for kind in ("train", "test"):
            path = split_dir / f"{kind}_{i}.csv"
            if not path.is_file():
                raise InputError(f"{path} is missing: every split needs train_{i}.csv and test_{i}.csv.")
            table = pd.read_csv(path, dtype=str)
            missing = {"sample_id", "patches_path", "expr_path"} - set(table.columns)
            if missing:
                raise InputError(f"{path} lacks columns {sorted(missing)} (HEST splits have sample_id, patches_path, expr_path).")
            rows.append(tuple(SplitSample(r.sample_id, r.patches_path, r.expr_path) for r in table.itertuples()))
        splits.append(Split(i, rows[0], rows[1]))
    if not splits:
        raise InputError(f"{split_dir} has no train_0.csv/test_0.csv.")
    return splits


def read_gene_list(task_dir: Path, name: str) -> list[str]:
    """The task's gene list (`{"genes": [...]}`, HEST's var_50genes.json)."""
    path = task_dir / name
    if not path.is_file():
        raise InputError(f"Gene list {path} not found (HEST tasks ship {HEST_GENE_LIST}; pass --gene-list NAME for another file).")
    try:
        genes = json.loads(path.read_text())["genes"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a HEST gene list ({{\"genes\": [...]}}): {exc}.") from None
    return [str(g) for g in genes]


def patch_barcodes(task_dir: Path, row: SplitSample) -> np.ndarray | None:
    """Barcodes of HEST's patch file for a sample (its spots), or None when the file is absent."""
    import h5py

    path = task_dir / row.patches_path
    if not path.is_file():
        return None
    with h5py.File(path, "r") as fh:
        if "barcode" not in fh:
            raise InputError(f"{path} has no 'barcode' dataset (HEST patch files hold img, barcode, coords).")
        return np.asarray(fh["barcode"][:]).ravel().astype(str)


def log1p_expression(task_dir: Path, row: SplitSample, genes: Sequence[str], barcodes: np.ndarray) -> np.ndarray:
    """log1p of the counts of `genes` at `barcodes` (HEST: `load_adata(..., normalize=True)`)."""
    import anndata as ad
    import scipy.sparse as sp

    path = task_dir / row.expr_path
    if not path.is_file():
        raise InputError(f"Expression file {path} (split row of '{row.sample_id}') not found.")
    adata = ad.read_h5ad(path)
    lookup = {g: i for i, g in enumerate(adata.var_names.astype(str))}
    missing_genes = [g for g in genes if g not in lookup]
    if missing_genes:
        raise InputError(f"{path} lacks {len(missing_genes)} genes of the gene list, e.g. {missing_genes[:10]}.")
    spots = {b: i for i, b in enumerate(adata.obs_names.astype(str))}
    missing = [b for b in barcodes if b not in spots]
    if missing:
        raise InputError(f"{len(missing)} spots of '{row.sample_id}' have no expression in {path}, e.g. {missing[:5]}.")
    x = adata.X[[spots[b] for b in barcodes]][:, [lookup[g] for g in genes]]
    x = x.toarray() if sp.issparse(x) else np.asarray(x)
    return np.log1p(x.astype(np.float64))


def load_rows(cache: FeatureCache, task_dir: Path, rows: Sequence[SplitSample], genes: Sequence[str]) -> tuple[SpotFeatures, np.ndarray, dict[str, Any]]:
    """Cached features and log1p targets of the HEST spots of `rows`, joined by barcode."""
    ids = [r.sample_id for r in rows]
    cached_ids = set(cache.samples())
    absent = [i for i in ids if i not in cached_ids]
    if absent:
        raise InputError(
            f"Samples {absent} of {task_dir.name} are not in the cache {cache.root}. Extract them first "
            f"(genedml extract HEST_1K_DIR --samples {','.join(absent)} --cache {cache.root} ...)."
        )
    feats = load_spot_features(cache, ids, with_aug=False)
    picks, targets, lost = [], [], {}
    for slide, row in enumerate(rows):
        rows_of_slide = np.flatnonzero(feats.slide == slide)
        cached = feats.barcodes[rows_of_slide]
        wanted = patch_barcodes(task_dir, row)
        if wanted is None:
            keep = np.ones(len(cached), dtype=bool)
        else:
            keep = np.isin(cached, wanted)
            not_cached = int(len(set(wanted.tolist()) - set(cached.tolist())))
            if not_cached:
                lost[row.sample_id] = not_cached
        picks.append(rows_of_slide[keep])
        targets.append(log1p_expression(task_dir, row, genes, cached[keep]))
    return feats.take(np.concatenate(picks)), np.concatenate(targets), lost


def fit_predict(model: str, settings: HestBenchSettings, cache: FeatureCache, task_dir: Path, split: Split, genes: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Fit head `model` on the split's training sections, predict its test spots; returns truth, prediction, facts."""
    from genedml.heads.registry import head_settings, make_head

    train_rows = list(split.train)
    val_rows: list[SplitSample] = []
    if model in NEURAL_HEADS and settings.val_fraction > 0:
        train_ids, val_ids = split_samples([r.sample_id for r in train_rows], None, None, settings.val_fraction, settings.seed)
        val_rows = [r for r in train_rows if r.sample_id in val_ids]
        train_rows = [r for r in train_rows if r.sample_id in train_ids]
    train, y_train, lost = load_rows(cache, task_dir, train_rows, genes)
    val, y_val, _ = load_rows(cache, task_dir, val_rows, genes) if val_rows else (None, None, {})
    test, y_test, lost_test = load_rows(cache, task_dir, list(split.test), genes)
    shared = {**settings.head, "epochs": settings.epochs, "seed": settings.seed}
    head = make_head(model, head_settings(model, HEST_PROBE if model == "ridge" else {}, shared=shared))
    start = time.perf_counter()
    head.fit(train, y_train, val, y_val)
    facts = {
        "n_train": int(len(train)), "n_test": int(len(test)), "fit_seconds": round(time.perf_counter() - start, 2),
        "validation_samples": [r.sample_id for r in val_rows], "spots_not_in_cache": lost | lost_test,
        "history": {k: v for k, v in head.history_.items() if k in ("alpha", "best_epoch", "best_val_pcc", "n_components", "cv")},
    }
    return y_test, head.predict(test), facts


def run_hest_bench(bench_dir: str | Path, cache_dir: str | Path, out: str | Path, settings: HestBenchSettings) -> dict[str, Any]:
    """Every task × head × split; writes HEST-shaped results (dataset_results.json, results_kfold.json) and a table."""
    from genedml.heads.registry import head_settings

    for model in settings.models:  # every setting is checked before any work starts
        head_settings(model, HEST_PROBE if model == "ridge" else {}, shared={**settings.head, "epochs": settings.epochs, "seed": settings.seed})
    cache = FeatureCache(cache_dir)
    backbone = str(cache.settings.get("backbone"))
    if settings.backbone and settings.backbone != backbone:
        raise CacheMismatchError(f"--backbone {settings.backbone}, but the cache {cache.root} was made with '{backbone}'.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = find_tasks(bench_dir, settings.tasks)
    results: list[dict[str, Any]] = []
    for task_dir in tasks:
        genes = read_gene_list(task_dir, settings.gene_list)
        splits = read_splits(task_dir)
        per_model = []
        for model in settings.models:
            split_results = []
            for split in splits:
                truth, pred, facts = fit_predict(model, settings, cache, task_dir, split, genes)
                split_results.append(_split_result(truth, pred, genes, facts))
                write_json(out / task_dir.name / model / f"split{split.index}" / "results.json", split_results[-1])
                log.info("hest %s | %s | split %d: Pearson %.4f", task_dir.name, model, split.index, split_results[-1]["pearson_mean"])
            kfold = merge_splits(split_results)
            write_json(out / task_dir.name / model / "results_kfold.json", kfold)
            per_model.append({"encoder_name": _row_name(backbone, model), "head": model, **{k: kfold[k] for k in ("pearson_mean", "pearson_std", "mean_per_split")}})
        results.append({"dataset_name": task_dir.name, "results": per_model})
    average = {r["encoder_name"]: float(np.mean([t["pearson_mean"] for d in results for t in d["results"] if t["encoder_name"] == r["encoder_name"]]))
               for r in results[0]["results"]}
    summary = {"results": results, "average": average, "backbone": backbone, "weights": cache.settings.get("weights"),
               "geometry": _geometry(cache), "protocol": PROTOCOL}
    summary["markdown"] = markdown(summary)
    write_json(out / "dataset_results.json", {k: v for k, v in summary.items() if k != "markdown"})
    write_text_atomic(out / "hest_bench.md", summary["markdown"])
    return summary


PROTOCOL = (
    "HEST-Benchmark: the task's splits; spots of its patch files; targets log1p(counts) of its gene list; Pearson r "
    "per gene over the concatenated test split, mean over genes; mean ± population std over splits; average = mean over tasks."
)


def _split_result(truth: np.ndarray, pred: np.ndarray, genes: list[str], facts: dict[str, Any]) -> dict[str, Any]:
    """One split in HEST's results.json shape (pearson_corrs per gene, pearson_mean/std over genes) plus facts."""
    r = pearson_per_gene(truth, pred)
    valid = np.isfinite(r)
    if not valid.any():
        raise InputError("No gene has a Pearson r on this test split (all constant); check the gene list and the counts.")
    return {
        "pearson_corrs": [{"name": g, "pearson_corr": float(v) if np.isfinite(v) else None} for g, v in zip(genes, r)],
        "pearson_mean": float(r[valid].mean()),
        "pearson_std": float(r[valid].std()),
        "n_genes_constant": int((~valid).sum()),
        "l2_error_mean": float(np.mean((truth - pred) ** 2)),
        **facts,
    }


def merge_splits(splits: list[dict[str, Any]]) -> dict[str, Any]:
    """HEST's `merge_fold_results`: per-gene r over splits, and the mean and (population) std of the split means."""
    per_gene: dict[str, list[float]] = {}
    for split in splits:
        for item in split["pearson_corrs"]:
            if item["pearson_corr"] is not None:
                per_gene.setdefault(item["name"], []).append(item["pearson_corr"])
    genes = [{"name": g, "pearson_corrs": v, "mean": float(np.mean(v)), "std": float(np.std(v))} for g, v in per_gene.items()]
    means = [s["pearson_mean"] for s in splits]
    return {
        "pearson_corrs": sorted(genes, key=lambda g: -g["mean"]),
        "pearson_mean": float(np.mean(means)),
        "pearson_std": float(np.std(means)),
        "mean_per_split": means,
    }


def _row_name(backbone: str, model: str) -> str:
    return f"{backbone} + {model}" + (" (HEST probe)" if model == "ridge" else "")


def _geometry(cache: FeatureCache) -> dict[str, Any]:
    """The cache's patch geometry (HEST: 224 px at 0.5 µm/px = 112 µm)."""
    fov = sorted({round(float(cache.sample_attrs(s).get("fov_um", 0.0))) for s in cache.samples()})
    return {"patch_px": cache.settings.get("patch_px"), "mpp_target": cache.settings.get("mpp_target"), "patch_um": fov}


def markdown(summary: dict[str, Any]) -> str:
    """The leaderboard shape: one row per backbone + head, one column per task, then the average."""
    tasks = [d["dataset_name"] for d in summary["results"]]
    names = list(summary["average"])
    header = [HEST_TASKS.get(t.upper(), t) for t in tasks]
    lines = ["| Model | " + " | ".join(header) + " | Average |", "|---|" + "---|" * (len(tasks) + 1)]
    for name in names:
        cells = []
        for d in summary["results"]:
            r = next(t for t in d["results"] if t["encoder_name"] == name)
            cells.append(f"{r['pearson_mean']:.4f} ± {r['pearson_std']:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {summary['average'][name]:.4f} |")
    notes = [PROTOCOL]
    g = summary["geometry"]
    if not (g["patch_px"] == HEST_PATCH_PX and g["mpp_target"] is not None and abs(float(g["mpp_target"]) - HEST_MPP) < 1e-6):
        notes.append(f"This cache: {g['patch_px']} px patches at {g['mpp_target'] or 'each slide’s own'} µm/px "
                     f"({', '.join(f'{u:g}' for u in g['patch_um'])} µm); HEST: {HEST_PATCH_PX} px at {HEST_MPP:g} µm/px "
                     f"({HEST_PATCH_PX * HEST_MPP:g} µm). Extract with --patch-px 224 --mpp-target 0.5 for leaderboard-comparable rows.")
    if len(tasks) < len(HEST_TASKS):
        notes.append(f"Average over {len(tasks)} task(s); the leaderboard's Average is over its {len(HEST_TASKS)} tasks.")
    if summary.get("weights") == "random-init":
        notes.append("Features from a random-init backbone: not a biology result.")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


