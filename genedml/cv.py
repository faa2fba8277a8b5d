"""`genedml cv`: leave-one-group-out cross-validation of several heads on identical folds."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from genedml.ablations import ABLATIONS
from genedml.spots import load_spot_features
from genedml.cache.store import FeatureCache
from genedml.data.sample import Sample
from genedml.errors import ConfigError, InputError
from genedml.evaluate import score
from genedml.fit import FitSettings, fit_model
from genedml.jsonio import jsonable, write_json, write_text_atomic
from genedml.targets import targets_at
from genedml.typed import check_fields, check_unique, flag_of
from genedml.predict import Predictor, RetrievalSettings
from genedml.log import log


NEURAL_HEADS = {"genedml", "triplex", "bleep"}


METRICS = ("pcc_acg", "pcc_heg", "pcc_hvg", "mse", "mae")


@dataclass
class CVSettings:
    by: str = "patient"
    models: list[str] = field(default_factory=lambda: ["genedml"])
    ablations: list[str] = field(default_factory=list)
    samples: list[str] | None = None
    test_samples: list[str] | None = None
    genes: int = 250
    gene_list: Path | None = None
    log: str = "log1p"
    smooth: bool = False
    epochs: int = 200
    seeds: list[int] = field(default_factory=lambda: [2021])
    retrieve_k: int | None = None
    blend: float = 1.0
    val_fraction: float = 0.2
    head: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """One row of the table: a head, optional ablation overrides, optional retrieval at predict time."""

    name: str
    model: str
    overrides: tuple[tuple[str, Any], ...] = ()
    retrieval: RetrievalSettings | None = None


def make_folds(samples: Sequence[Sample], by: str, test_samples: Sequence[str] | None = None) -> list[dict[str, list[str]]]:
    """Leave-one-group-out folds (by patient or sample), or one fixed test split."""
    ids = [s.sample_id for s in samples]
    if test_samples:
        unknown = sorted(set(test_samples) - set(ids))
        if unknown:
            raise InputError(f"--test-samples {unknown} not found (known: {ids}).")
        return [{"name": "+".join(test_samples), "test": list(test_samples), "train": [i for i in ids if i not in test_samples]}]
    if by == "patient":
        unknown = [s.sample_id for s in samples if not s.patient_known]
        if unknown:
            log.warning(
                "--by patient, but patient ids are unknown for %s (each is treated as its own patient); pass a samples table "
                "(sample_id,patient_id) to keep sections of one patient on one side", unknown,
            )
        key = {s.sample_id: s.patient_id for s in samples}
    elif by == "sample":
        key = {i: i for i in ids}
    else:
        raise InputError(f"--by must be 'patient' or 'sample', got {by!r}.")
    groups = list(dict.fromkeys(key[i] for i in ids))
    if len(groups) < 2:
        raise InputError(f"Cross-validation by {by} needs at least 2 groups, found {groups}.")
    return [{"name": g, "test": [i for i in ids if key[i] == g], "train": [i for i in ids if key[i] != g]} for g in groups]


def variants(settings: CVSettings) -> list[Variant]:
    rows = [Variant(m, m) for m in settings.models]
    for ablation in settings.ablations:
        if ablation not in ABLATIONS:
            raise InputError(f"Unknown --ablation {ablation!r}; choose from {sorted(ABLATIONS)}.")
        rows.append(Variant(ABLATIONS[ablation].label, "genedml", tuple(ABLATIONS[ablation].overrides.items())))
    if settings.retrieve_k is not None:
        r = RetrievalSettings(k=settings.retrieve_k, blend=settings.blend)
        rows += [Variant(f"{m} + retrieval (k={r.k}, blend={r.blend:g})", m, (), r) for m in settings.models if m == "genedml"]
    return rows


def variant_settings(variant: Variant, settings: CVSettings, seed: int) -> Any:
    """Typed head settings of one variant: cv's shared values where the head has them, then its overrides."""
    from genedml.heads.registry import head_settings

    shared = {**settings.head, "epochs": settings.epochs, "seed": seed}
    return head_settings(variant.model, dict(variant.overrides), shared=shared)


RUNS_FILE = "cv_runs.json"  # one row per (fold, variant, seed), rewritten atomically as each run ends
PLAN_FILE = "cv_plan.json"  # the settings, folds and cache the rows belong to; --resume requires it unchanged


def fit_settings(variant: Variant, settings: CVSettings, seed: int, train: list[str] | None) -> FitSettings:
    """The fit of one variant on one fold; building it validates every cv setting the fit uses."""
    return FitSettings(
        model=variant.model, genes=settings.genes, gene_list=settings.gene_list, log=settings.log, smooth=settings.smooth,
        train_samples=train, seed=seed, head=variant_settings(variant, settings, seed),
        # Closed-form heads never use a validation section: they train on every training section.
        val_fraction=settings.val_fraction if variant.model in NEURAL_HEADS else 0.0,
    )


def check_settings(settings: CVSettings) -> None:
    """Refuse any bad cv setting before a sample is read or a file written."""
    check_fields(settings, flag_of)
    if settings.by not in ("patient", "sample"):
        raise ConfigError(f"--by must be 'patient' or 'sample', got {settings.by!r}.")
    if not settings.seeds:
        raise ConfigError("--seeds needs at least one seed.")
    if len(set(settings.seeds)) != len(settings.seeds):
        raise ConfigError(f"--seeds lists a seed twice ({settings.seeds}); each seed is one run.")
    check_unique("--samples", settings.samples)
    check_unique("--test-samples", settings.test_samples)
    rows = variants(settings)
    if not rows:
        raise ConfigError("Nothing to run: give at least one --model or --ablation.")
    for variant in rows:
        fit_settings(variant, settings, settings.seeds[0], None)


def run_cv(
    data: str | Path, cache_dir: str | Path, out: str | Path, settings: CVSettings, *,
    read_kwargs: dict[str, Any] | None = None, folds: list[dict[str, Any]] | None = None, resume: bool = False,
) -> dict[str, Any]:
    """Fit/predict/evaluate every variant on every fold; write folds, per-run metrics and the summary.

    `folds` ({"name", "train", "test"} each) replaces the leave-one-group-out folds, e.g. a paper's own.
    Every finished run is added to OUT/cv_runs.json at once; `resume` keeps the runs an interrupted call
    with the same settings, folds and cache already finished, and does only the rest.
    The summary also carries the per-run rows under "runs".
    """
    from genedml.data import read_samples

    check_settings(settings)
    cache = FeatureCache(cache_dir)
    out = Path(out)
    ids = settings.samples or cache.samples()
    samples = read_samples(data, samples=ids, **{k: v for k, v in (read_kwargs or {}).items() if v is not None})
    by_id = {s.sample_id: s for s in samples}
    folds = folds or make_folds(samples, settings.by, settings.test_samples)
    _check_retrieve_k(settings, folds, by_id)
    plan = _plan(settings, folds, cache)
    runs = _finished_runs(out, plan) if resume else []
    if not resume and (out / RUNS_FILE).is_file():
        log.warning("%s holds runs of an earlier cv; starting over (pass --resume to keep the finished ones)", out / RUNS_FILE)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / PLAN_FILE, plan)
    write_json(out / RUNS_FILE, runs)
    done = {(r["fold"], r["variant"], r["seed"]) for r in runs}
    total = len(folds) * sum(len(_seeds_of(v, settings)) for v in variants(settings))
    fitted: dict[tuple[str, str, int], Path] = {}
    for fold in folds:
        for variant in variants(settings):
            for seed in _seeds_of(variant, settings):
                key = (fold["name"], variant.model + repr(variant.overrides), seed)
                model_dir = out / "models" / _slug(fold["name"]) / model_dir_name(variant) / f"seed{seed}"
                if (fold["name"], variant.name, seed) in done:
                    if model_dir.is_dir():  # a retrieval row still to run reuses it; loading it verifies it
                        fitted[key] = model_dir
                    continue
                fit_seconds = 0.0
                if key not in fitted:  # retrieval rows reuse the fitted regression model of the same fold
                    t0 = time.perf_counter()
                    fit_model(cache, None, model_dir, fit_settings(variant, settings, seed, fold["train"]), samples=by_id,
                              overwrite=True)  # cv's own output
                    fit_seconds = time.perf_counter() - t0
                    fitted[key] = model_dir
                metrics = evaluate_fold(fitted[key], cache, fold["test"], by_id, variant.retrieval)
                runs.append({"fold": fold["name"], "variant": variant.name, "seed": seed, "fit_seconds": round(fit_seconds, 2), **metrics})
                write_json(out / RUNS_FILE, runs)
                log.info("cv run %d/%d, %s | %s | seed %d: PCC-ACG %.4f", len(runs), total, fold["name"], variant.name, seed,
                         metrics["pcc_acg"] or float("nan"))
    summary = summarise(runs, folds, settings, cache)
    write_json(out / "cv_summary.json", summary)
    write_text_atomic(out / "cv_summary.md", summary["markdown"])
    return summary | {"runs": runs}


def _check_retrieve_k(settings: CVSettings, folds: list[dict[str, Any]], samples: dict[str, Sample]) -> None:
    """A --retrieve-k larger than a fold's reference bank would run as k = bank size under a row named k = K:
    refuse it before any fit. The bank holds at most the fold's training spots (fit also keeps a validation
    section out of it), so this catches every certain case."""
    if settings.retrieve_k is None:
        return
    spots = {f["name"]: sum(len(samples[s].barcodes) for s in f["train"] if s in samples) for f in folds}
    name = min(spots, key=spots.__getitem__)
    if settings.retrieve_k > spots[name]:
        raise ConfigError(f"--retrieve-k {settings.retrieve_k} exceeds the reference bank of fold {name}, which holds at most "
                          f"its {spots[name]} training spots; use --retrieve-k {min(50, spots[name])} or fewer.")


def _seeds_of(variant: Variant, settings: CVSettings) -> list[int]:
    """Neural heads run once per seed; closed-form heads give the same model for every seed, so run once."""
    return settings.seeds if variant.model in NEURAL_HEADS else settings.seeds[:1]


def _plan(settings: CVSettings, folds: list[dict[str, Any]], cache: FeatureCache) -> dict[str, Any]:
    """What the rows of a cv depend on: its settings, folds, and the identity of every cached sample it reads."""
    used = sorted({s for f in folds for s in f["train"] + f["test"]})
    complete = set(cache.samples())
    features = {s: cache.sample_attrs(s).get("integrity") for s in used if s in complete}
    plan = {"format": "genedml-cv-plan/1", "settings": asdict(settings), "folds": folds,
            "cache": {"settings": cache.settings, "samples": features}}
    if settings.gene_list is not None:  # the panel is the file's content, not its name
        plan["settings"]["gene_list_sha256"] = hashlib.sha256(Path(settings.gene_list).read_bytes()).hexdigest()
    return jsonable(plan)


def _finished_runs(out: Path, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs to keep on --resume: those of OUT's earlier cv, refused if it had other settings, folds or features."""
    if not (out / PLAN_FILE).is_file() or not (out / RUNS_FILE).is_file():
        log.info("--resume: %s has no earlier cv runs; starting from the first fold", out)
        return []
    try:
        earlier = json.loads((out / PLAN_FILE).read_text())
        runs = json.loads((out / RUNS_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"--resume: cannot read the earlier cv in {out} ({exc}); remove it or choose another --out.") from exc
    changed = [k for k in ("format", "settings", "folds", "cache") if earlier.get(k) != plan[k]]
    if changed:
        detail = "; ".join(f"{k}.{name}" for k in changed if isinstance(plan[k], dict)
                           for name in sorted(set(plan[k]) | set(earlier.get(k) or {})) if plan[k].get(name) != (earlier.get(k) or {}).get(name))
        raise ConfigError(f"--resume: the cv in {out} was run with other {', '.join(changed)} ({detail or 'see ' + PLAN_FILE}); "
                          "resume it with the same settings and cache, or choose another --out.")
    if not isinstance(runs, list) or not all(isinstance(r, dict) and {"fold", "variant", "seed"} <= set(r) for r in runs):
        raise InputError(f"--resume: {out / RUNS_FILE} is not a list of cv runs; remove it or choose another --out.")
    log.info("--resume: keeping %d finished runs of %s", len(runs), out)
    return runs


def evaluate_fold(model_dir: Path, cache: FeatureCache, test_ids: list[str], samples: dict[str, Sample], retrieval: RetrievalSettings | None) -> dict[str, Any]:
    predictor = Predictor(model_dir)
    predictor.check_cache(cache)
    truth, preds = [], []
    for sample_id in test_ids:
        feats = load_spot_features(cache, [sample_id], with_aug=False)
        truth.append(targets_at(samples[sample_id], feats.barcodes, predictor.targets))
        preds.append(predictor.predict(feats, retrieval)["X"])
    metrics = score(truth, preds, test_ids, predictor.targets)
    flat = {k: metrics["per_slide_mean"][k] for k in METRICS}
    flat |= {f"pooled_{k}": metrics["pooled"][k] for k in METRICS}
    flat["pcc_hpg"] = metrics["per_slide_mean"]["pcc_hpg"]  # test-selected genes: optimistic, kept out of the table
    flat["gene_pcc"] = dict(zip(predictor.targets.panel, metrics["per_gene"]["pcc_per_slide_mean"]))
    flat["best_epoch"] = predictor.config.get("best_epoch")
    if retrieval is not None:  # k as run: a bank smaller than k (the validation section is left out) clamps it
        flat["retrieve_k_used"] = min(retrieval.k, int(predictor.config.get("bank", {}).get("spots", retrieval.k)))
    return flat


def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return None, None
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(runs: list[dict[str, Any]], folds: list[dict[str, Any]], settings: CVSettings, cache: FeatureCache) -> dict[str, Any]:
    """Per variant: mean ± std over folds of the seed-averaged metric, plus the mean std across seeds."""
    table: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        rows = [r for r in runs if r["variant"] == name]
        entry: dict[str, Any] = {}
        for metric in (*METRICS, "fit_seconds"):
            per_fold = [np.mean([r[metric] for r in rows if r["fold"] == f["name"] and r[metric] is not None] or [np.nan]) for f in folds]
            mean, std = _mean_std([None if np.isnan(x) else float(x) for x in per_fold])
            entry[metric] = {"mean": mean, "std_folds": std if len(folds) > 1 else None}
            seed_std = [np.std([r[metric] for r in rows if r["fold"] == f["name"]], ddof=1) for f in folds if sum(r["fold"] == f["name"] for r in rows) > 1]
            if seed_std:
                entry[metric]["std_seeds"] = float(np.nanmean(seed_std))
        table[name] = entry
    weights = cache.settings.get("weights")
    header = "| method | PCC-ACG | PCC-HEG | PCC-HVG | MSE | MAE | fit s |\n|---|---|---|---|---|---|---|\n"

    def cell(e: dict[str, Any]) -> str:
        if e["mean"] is None:
            return "n/a"
        text = f"{e['mean']:.3f}" + (f" ± {e['std_folds']:.3f}" if e["std_folds"] is not None else "")
        return text + (f" (seeds ± {e['std_seeds']:.3f})" if "std_seeds" in e else "")

    def fit_cell(name: str, e: dict[str, Any]) -> str:
        return "(reuses the fit above)" if " + retrieval" in name else f"{e['fit_seconds']['mean']:.1f}"

    lines = [f"| {name} | " + " | ".join(cell(e[m]) for m in METRICS) + f" | {fit_cell(name, e)} |" for name, e in table.items()]
    note = "PCC per slide then mean over slides; ± = std over folds (seed-averaged per fold); seeds ± = mean std over seeds."
    if weights == "random-init":
        note += " Features from a random-init backbone: not a biology result."
    clamped = sorted({(r["fold"], r["retrieve_k_used"]) for r in runs if r.get("retrieve_k_used", settings.retrieve_k) != settings.retrieve_k})
    if clamped:
        note += (f" Retrieval ran with fewer neighbours than k={settings.retrieve_k} where the bank was smaller: "
                 + ", ".join(f"{fold} k={k}" for fold, k in clamped) + ".")
    markdown = header + "\n".join(lines) + f"\n\n{note}\nbackbone: {cache.settings.get('backbone')} ({weights}); folds by {settings.by}: " + "; ".join(f"{f['name']}: test {f['test']}" for f in folds) + "\n"
    return {"table": table, "folds": folds, "seeds": settings.seeds, "backbone": cache.settings.get("backbone"), "weights": weights, "markdown": markdown}


def model_dir_name(variant: Variant) -> str:
    """The folder of a variant's models under OUT/models/FOLD. A retrieval row reuses the fit of its plain model
    row, so it names that row's folder; any other row its own (an ablation label may contain " + " too)."""
    return _slug(variant.model if variant.retrieval is not None else variant.name)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text).strip("_") or "x"
