"""The `genedml` command line: a thin skin over the library (parse flags, call a function, print).

Any flag of `fit`, `cv`, `extract`, `predict` may also come from a TOML file given with `--config FILE`
(keys are flag names, e.g. `lambda-group = 0.8`); flags on the command line win over the file.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

import genedml
from genedml.ablations import ABLATION_HELP
from genedml.errors import ConfigError, GenedmlError
from genedml.jsonio import parse_key_values
from genedml.typed import check_unique
from genedml.progress import console, setup_logging

app = typer.Typer(
    name="genedml",
    help="Predict spatial gene expression from H&E: extract frozen-backbone features once, train Gene-DML heads "
    "on the cache, predict by regression or retrieval.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect spatial-transcriptomics inputs.", no_args_is_help=True)
app.add_typer(data_app, name="data")

ConfigOpt = typer.Option(None, "--config", help="TOML file with default values for any flag of this command.")
MppOpt = typer.Option(None, help="µm per level-0 pixel for all samples (overrides what the files say).")
SamplesTableOpt = typer.Option(None, help="CSV sample_id,patient_id[,mpp] (default: DATA/samples.csv when present).")
ImageOpt = typer.Option(None, help="Full-resolution image (AnnData / Space Ranger inputs).")
UnusualMppOpt = typer.Option(False, "--allow-unusual-mpp", help="Accept µm/px outside 0.05–20 (checked before any work).")
ResumeOpt = typer.Option(False, "--resume", help="Keep the runs an interrupted call with the same settings, folds and "
                         "features finished in --out, and do only the rest.")


def _version(value: bool) -> None:
    if value:
        console.print(f"genedml {genedml.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
) -> None:
    setup_logging(verbose)


def _csv(value: Optional[str], flag: str) -> Optional[list[str]]:
    """A comma-separated list of ids (None when the flag is not given). An empty list or an id given twice is
    refused: `--samples ""` (an unset shell variable) would otherwise mean every sample, and a repeat runs twice."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ConfigError(f"{flag} {value!r} names nothing; leave {flag} out for the default.")
    check_unique(flag, items)
    return items


def _seeds(value: Optional[str]) -> list[int]:
    """`--seeds 2021,2022` as integers (default 2021); anything else is a ConfigError, not a traceback."""
    items = _csv(value, "--seeds") or ["2021"]
    try:
        return [int(s) for s in items]
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers (e.g. 2021,2022,2023), got {value!r}.") from None


# Defaults of fit's flags that only some heads have: a changed value for a head without it is an error.
GENERIC_HEAD_DEFAULTS = {
    "scales": None, "instance": True, "group": True, "groups": 18, "lambda_group": None,
    "tau": 0.07, "tau_group": 0.07, "group_form": "reference", "epochs": 200, "patience": 20, "batch_size": 512,
    "lr": 1e-4, "seed": 2021,
}


def _head_settings(model: str, generic: dict[str, Any], options: dict[str, Any]) -> Any:
    """The head's typed settings from fit's generic flags and its --head-option values (which must all fit)."""
    from genedml.heads.registry import accepted_settings, head_settings

    accepted = accepted_settings(model)
    # A flag left at fit's default keeps the head's own default (TRIPLEX has no contrastive pathways, so
    # passing fit's instance=True, group=True would refuse `--model triplex`).
    given = {key: value for key, value in generic.items() if value != GENERIC_HEAD_DEFAULTS.get(key)}
    for key in given:
        if key not in accepted:
            raise GenedmlError(f"{_flag_of(key)} does not apply to --model {model} (it has no setting {key!r}).")
    _refuse_conflicts(given, options)
    return head_settings(model, options, shared=given)


def _flag_of(setting: str) -> str:
    """The fit flag that sets a head setting (`lambda_group` → `--lambda-group`, `group` → `--no-group`)."""
    return {"instance": "--no-instance", "group": "--no-group"}.get(setting, "--" + setting.replace("_", "-"))


def _refuse_conflicts(flags: dict[str, Any], options: dict[str, Any]) -> None:
    """A flag changed from its default and a --head-option of the same setting must agree: which one the
    user meant is not ours to guess (the option used to win silently)."""
    for key, value in flags.items():
        if value != GENERIC_HEAD_DEFAULTS.get(key) and key in options and options[key] != value:
            raise ConfigError(f"{_flag_of(key)} and --head-option {key}={options[key]!r} set the same setting to different values; give one.")


def _retrieval_flags_need_k(retrieve_k: Optional[int], *flags: tuple[str, Any, Any]) -> None:
    """Retrieval flags set without --retrieve-k were ignored: the user asked for a blend and got regression."""
    if retrieve_k is None:
        changed = [flag for flag, value, default in flags if value != default]
        if changed:
            verb, pronoun = ("applies", "it") if len(changed) == 1 else ("apply", "them")
            raise ConfigError(f"{', '.join(changed)} {verb} only to retrieval: add --retrieve-k K (e.g. 50), or drop {pronoun}.")


def _check_mpp(mpp: Optional[float], allow_unusual: bool, flag: str = "--mpp") -> None:
    from genedml.extract.geometry import check_mpp

    check_mpp(mpp, "", allow_unusual=allow_unusual, source=flag)


def _out_dir(path: Path, flag: str = "--out") -> None:
    """An output folder path must not be an existing file (checked before any work)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; give a folder path (it is created if missing).")


def _existing_cache(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--cache {path} is a file, not a feature cache folder (made by `genedml extract`).")
    if not path.exists():
        raise ConfigError(f"--cache {path} does not exist; make it with `genedml extract DATA --cache {path}`.")


def _table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for key in rows[0] if rows else []:
        table.add_column(str(key))
    for row in rows:
        table.add_row(*[("" if v is None else str(v)) for v in row.values()])
    return table


# ---------------------------------------------------------------------------------------------- data
@data_app.command("inspect")
def data_inspect(
    path: Path = typer.Argument(..., help="A dataset folder or .h5ad file (any supported format)."),
    mpp: Optional[float] = MppOpt,
    samples_table: Optional[Path] = SamplesTableOpt,
    image: Optional[Path] = ImageOpt,
    allow_unusual_mpp: bool = UnusualMppOpt,
) -> None:
    """Print one row per sample found: id, spots, genes, mpp, patient, format."""
    from genedml.data import inspect_samples

    _check_mpp(mpp, allow_unusual_mpp)
    rows = inspect_samples(path, mpp=mpp, samples_table=samples_table, image=image)
    for row in rows:
        img = row.get("image") or {}
        row["image"] = f"{Path(str(img.get('path', ''))).name} ({img.get('width')}x{img.get('height')})" if img else ""
        row["mpp"] = f"{row['mpp']:.4f}" if isinstance(row.get("mpp"), float) else row.get("mpp")
        row["patient"] = row.get("patient") or "(unknown)"
    console.print(_table(rows, f"{path}"))


# ----------------------------------------------------------------------------------------- backbones
@app.command()
def backbones() -> None:
    """List the backbone registry: dimensions and whether weights are found."""
    console.print(_backbone_table())


def _backbone_table() -> Table:
    from genedml.backbones.doctor import backbone_rows

    keep = ("name", "arch", "dim", "pooling", "weights")
    return _table([{k: row.get(k) for k in keep} for row in backbone_rows()], "backbones (weights: where found, or what to do)")


@app.command()
def doctor() -> None:
    """Report torch/timm/faiss builds, devices, and weight availability for each backbone."""
    from genedml.backbones.doctor import environment_report

    for key, value in environment_report().items():
        console.print(f"[bold]{key}[/bold]: {escape(str(value))}")
    console.print(_backbone_table())


# ------------------------------------------------------------------------------------------- extract
@app.command()
def extract(
    data: Path = typer.Argument(..., help="Dataset folder or .h5ad (auto-detected format)."),
    backbone: str = typer.Option(..., "--backbone", "-b", help="Registered name or timm:<arch> (see `genedml backbones`)."),
    cache: Path = typer.Option(..., "--cache", help="Feature cache directory (one per backbone and geometry)."),
    weights: Optional[Path] = typer.Option(None, help="Weights file or folder (else $GENEDML_WEIGHTS_DIR/<name>/ or a warm HF cache)."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights (tests, demo, speed runs; not biology)."),
    samples: Optional[str] = typer.Option(None, help="Comma-separated sample ids (default: all)."),
    scales: str = typer.Option("local,neighbor", help="local[,neighbor] (global is derived at fit time)."),
    neighbor_mode: str = typer.Option("lattice", help="lattice (shared tiles, fast) or exact (25 tiles per spot)."),
    local_tokens: str = typer.Option("cls", help="cls | 2x2 | 4x4 pooled patch-token grid kept besides the pooled vector | all (every patch token, as the reference model)."),
    augment: Optional[str] = typer.Option(None, help="dihedral: also store the 8 flip/rotation views of the local patch."),
    mpp_target: Optional[float] = typer.Option(None, help="Target µm/px of the patches (default: the slide's own)."),
    patch_px: int = typer.Option(224, help="Patch side in pixels fed to the backbone."),
    batch_size: int = typer.Option(64, help="Model batch size."),
    workers: Optional[int] = typer.Option(None, help="Patch-reading threads (default: 1 on CPU, several on GPU; 0 = main thread)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps."),
    dtype: str = typer.Option("float16", help="Storage dtype of the features."),
    overwrite: bool = typer.Option(False, help="Recompute samples already complete in the cache."),
    mpp: Optional[float] = MppOpt,
    samples_table: Optional[Path] = SamplesTableOpt,
    image: Optional[Path] = ImageOpt,
    allow_download: bool = typer.Option(False, help="Allow fetching weights from the Hugging Face hub."),
    allow_unusual_mpp: bool = UnusualMppOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Encode every spot of DATA with a frozen backbone into the feature cache (resumable)."""
    from genedml.extract.distributed import run_extraction_distributed

    _check_mpp(mpp, allow_unusual_mpp)
    _check_mpp(mpp_target, allow_unusual_mpp, "--mpp-target")
    settings = _extract_settings(patch_px, mpp_target, scales, neighbor_mode, local_tokens, augment, dtype, batch_size, workers, device)
    summary = run_extraction_distributed(
        data,
        backbone=backbone,
        weights=weights,
        random_init=random_init,
        allow_download=allow_download,
        cache_dir=cache,
        settings=settings,
        samples=_csv(samples, "--samples"),
        read_kwargs=dict(mpp=mpp, samples_table=samples_table, image=image),
        overwrite=overwrite,
        allow_unusual_mpp=allow_unusual_mpp,
    )
    if summary is not None:
        console.print(
            f"extract: {summary['samples_extracted']} samples extracted, {summary['samples_skipped']} skipped (complete), "
            f"{summary['spots']} spots in {summary['seconds']}s ({summary['spots_per_s']} spots/s), "
            f"{summary['tiles_per_spot']} tiles encoded per spot → {cache}"
        )
        if summary.get("locked"):
            console.print(f"skipped, being written by another process: {', '.join(summary['locked'])} (re-run to check they finished)")
        if summary.get("weights") == "random-init":
            console.print("[yellow]weights: random-init — these features carry no pretrained knowledge (not a biology result).[/yellow]")


def _extract_settings(patch_px, mpp_target, scales, neighbor_mode, local_tokens, augment, dtype, batch_size, workers, device):  # type: ignore[no-untyped-def]
    from genedml.extract.runner import ExtractSettings

    return ExtractSettings(
        patch_px=patch_px,
        mpp_target=mpp_target,
        scales=tuple(_csv(scales, "--scales") or ["local"]),
        neighbor_mode=neighbor_mode,
        local_tokens=local_tokens,
        augment=augment,
        dtype=dtype,
        batch_size=batch_size,
        workers=workers,
        device=device,
    )


@app.command("export-h5")
def export_h5_cmd(
    cache: Path = typer.Argument(..., help="Feature cache directory."),
    out_dir: Path = typer.Argument(..., help="Where to write <sample>.h5 files."),
    samples: Optional[str] = typer.Option(None, help="Comma-separated sample ids (default: all complete)."),
    layout: str = typer.Option("trident", help="trident: features + coords with TRIDENT's attrs (default); hest: embeddings, barcodes, coords for HEST's benchmark."),
) -> None:
    """Export pooled local features as .h5 files that TRIDENT (--layout trident) or HEST's benchmark (--layout hest) read."""
    from genedml.cache import FeatureCache, export_h5

    _existing_cache(cache)
    _out_dir(out_dir, "OUT_DIR")
    paths = export_h5(FeatureCache(cache), out_dir, _csv(samples, "--samples"), layout=layout)
    console.print(f"export-h5: wrote {len(paths)} {layout}-layout files to {out_dir}")


# --------------------------------------------------------------------------------------------- cache
cache_app = typer.Typer(help="Check feature caches.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("verify")
def cache_verify(
    cache: Path = typer.Argument(..., help="Feature cache directory."),
    deep: bool = typer.Option(False, "--deep", help="Also recompute checksums and read every value (reads the whole cache)."),
) -> None:
    """Find damaged samples: lost chunk files (and with --deep, changed chunks or missing values). Exit 1 if any."""
    from genedml.cache import FeatureCache
    from genedml.cache.verify import verify_cache

    checks = verify_cache(FeatureCache(cache), deep=deep)
    for check in checks:
        status = "ok" if check.ok else "[red]DAMAGED[/red]"
        console.print(f"{escape(check.sample_id)}: {status}" + "".join(f"\n  - {escape(p)}" for p in check.problems + check.notes))
    bad = [c.sample_id for c in checks if not c.ok]
    if bad:
        console.print(
            escape(f"cache verify: {len(bad)} of {len(checks)} samples damaged in {cache}. Re-extract them with the flags "
                   f"the cache was made with: genedml extract DATA --cache {cache} --samples {','.join(bad)} --overwrite"),
            soft_wrap=True,
        )
        raise typer.Exit(1)
    console.print(escape(f"cache verify: {len(checks)} samples ok in {cache}") + (" (deep)" if deep else " (chunk files present; --deep reads them)"))


# ----------------------------------------------------------------------------------------------- fit
@app.command()
def fit(
    cache: Path = typer.Option(..., "--cache", help="Feature cache made by `genedml extract`."),
    data: Path = typer.Option(..., "--data", help="The dataset the cache was made from (for expression targets)."),
    out: Path = typer.Option(..., "--out", help="Model directory to write (whole or not at all)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing model at --out (kept intact until the new one is complete)."),
    model: str = typer.Option("genedml", help="genedml | triplex | bleep | ridge | ridge-cv."),
    train_samples: Optional[str] = typer.Option(None, help="Comma-separated training sample ids (default: all not in validation)."),
    val_samples: Optional[str] = typer.Option(None, help="Comma-separated validation sample ids."),
    val_fraction: float = typer.Option(0.2, help="Fraction of training samples held out for validation when --val-samples is not given (whole patients when the training samples come from 3 or more known patients)."),
    genes: int = typer.Option(250, help="Panel size."),
    gene_select: str = typer.Option("mean", help="mean | variance."),
    gene_list: Optional[Path] = typer.Option(None, help="A text file with one gene per line (overrides --genes)."),
    normalize_over: str = typer.Option("panel", help="Library size over the panel (reference) or all genes."),
    log: str = typer.Option("log1p", help="log1p | log10 (the reference code's log10(1+x))."),
    smooth: bool = typer.Option(False, help="3x3 array-neighbourhood smoothing of the targets."),
    scales: Optional[str] = typer.Option(None, help="Scales used by genedml/triplex: local,neighbor,global or a subset (default: the head's own; genedml local,global, triplex all three; the paper's Gene-DML uses all three)."),
    no_instance: bool = typer.Option(False, "--no-instance", help="Ablation: drop the instance pathway."),
    no_group: bool = typer.Option(False, "--no-group", help="Ablation: drop the group pathway."),
    groups: int = typer.Option(18, help="K of the per-batch k-means (group pathway) and of the prototypes."),
    lambda_group: Optional[float] = typer.Option(None, help="Weight λ of the group loss (default: the head's own; the paper: 0.8)."),
    tau: float = typer.Option(0.07, help="Instance-loss temperature."),
    tau_group: float = typer.Option(0.07, help="Group-loss temperature."),
    group_form: str = typer.Option("reference", help="reference (f, g vs centroids) | cld (projected u, v)."),
    epochs: int = typer.Option(200, help="Maximum epochs."),
    patience: int = typer.Option(20, help="Early-stopping patience on validation PCC."),
    batch_size: int = typer.Option(512, help="Training batch size."),
    lr: float = typer.Option(1e-4, help="Adam learning rate."),
    seed: int = typer.Option(2021, help="Random seed."),
    expect_backbone: Optional[str] = typer.Option(None, help="Refuse a cache made with another backbone."),
    index: str = typer.Option("flat", help="Retrieval index over the reference bank: flat (exact), ivf, or ivfpq (10⁶+ spots; compressed, re-ranked exactly)."),
    max_memory: Optional[str] = typer.Option(None, "--max-memory", help="Most cached-feature bytes held in memory, e.g. 8GB; a larger training set is read from the cache slide by slide (neural heads; batches become slide-aware)."),
    head_option: list[str] = typer.Option([], "--head-option", help="Any head setting as KEY=VALUE, e.g. dim=128 or neighbor_depth=2 (repeatable)."),
    mpp: Optional[float] = MppOpt,
    samples_table: Optional[Path] = SamplesTableOpt,
    allow_unusual_mpp: bool = UnusualMppOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Train a head on cached features only (never opens an image) and write a model directory."""
    from genedml.fit import FitSettings, fit_model
    from genedml.model_dir import check_model_out

    _check_mpp(mpp, allow_unusual_mpp)

    generic = {
        "scales": tuple(_csv(scales, "--scales")) if scales is not None else None, "instance": not no_instance, "group": not no_group, "groups": groups,
        "lambda_group": lambda_group, "tau": tau, "tau_group": tau_group, "group_form": group_form,
        "epochs": epochs, "patience": patience, "batch_size": batch_size, "lr": lr, "seed": seed,
    }
    settings = FitSettings(
        model=model, genes=genes, gene_select=gene_select, gene_list=gene_list, normalize_over=normalize_over, log=log,
        smooth=smooth, train_samples=_csv(train_samples, "--train-samples"), val_samples=_csv(val_samples, "--val-samples"), val_fraction=val_fraction,
        seed=seed, expect_backbone=expect_backbone, index=index, max_memory=max_memory,
        head=_head_settings(model, generic, parse_key_values(head_option)),
    )
    check_model_out(out, overwrite)
    _existing_cache(cache)
    result = fit_model(cache, data, out, settings, read_kwargs=dict(mpp=mpp, samples_table=samples_table), progress=True, overwrite=overwrite)
    console.print(result.summary_line())


# ------------------------------------------------------------------------------------------- predict
@app.command()
def predict(
    model_dir: Path = typer.Argument(..., help="Model directory written by `genedml fit`."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Feature cache holding the samples to predict."),
    samples: Optional[str] = typer.Option(None, help="Comma-separated sample ids (default: all in the cache)."),
    out: Path = typer.Option(..., "--out", help="Output directory for <sample>.h5ad (or PNG maps for --slide)."),
    retrieve_k: Optional[int] = typer.Option(None, "--retrieve-k", help="Predict by FAISS retrieval of K reference spots."),
    weighting: str = typer.Option("uniform", help="uniform | softmax | inverse-l1 (retrieval neighbour weights)."),
    tau: float = typer.Option(0.07, help="Softmax temperature for --weighting softmax."),
    blend: float = typer.Option(1.0, help="w·retrieval + (1−w)·regression (1 = retrieval only)."),
    slide: Optional[Path] = typer.Option(None, help="An H&E slide without sequencing: detect tissue, tile virtual spots, predict."),
    mpp: Optional[float] = typer.Option(None, help="µm per pixel of --slide."),
    pitch_um: Optional[float] = typer.Option(None, help="Virtual-spot pitch for --slide (default: the training spot pitch)."),
    genes: Optional[str] = typer.Option(None, help="Genes to map for --slide (default: the 6 most highly expressed)."),
    weights: Optional[Path] = typer.Option(None, help="Backbone weights for --slide (must match the model's hash)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N | mps (--slide only: the backbone's device)."),
    allow_unusual_mpp: bool = UnusualMppOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Predict expression for cached samples (or a new slide) by regression and/or retrieval."""
    from genedml.devices import check_device
    from genedml.predict import Predictor, RetrievalSettings, predict_cache
    from genedml.slide import predict_slide

    _retrieval_flags_need_k(retrieve_k, ("--blend", blend, 1.0), ("--weighting", weighting, "uniform"), ("--tau", tau, 0.07))
    retrieval = RetrievalSettings(k=retrieve_k, weighting=weighting, tau=tau, blend=blend) if retrieve_k is not None else None
    check_device(device)
    _out_dir(out)
    if slide is not None:
        if cache is not None or samples is not None:
            raise ConfigError("predict --slide reads features from the slide itself: drop --cache/--samples (or drop --slide to predict cached samples).")
        if not slide.is_file():
            raise ConfigError(f"--slide {slide} is not a file (an H&E image: .tif/.svs/.jpg/.png...).")
        _check_mpp(mpp, allow_unusual_mpp)
        paths = predict_slide(Predictor(model_dir), slide, out, mpp=mpp, pitch_um=pitch_um, genes=_csv(genes, "--genes"), retrieval=retrieval,
                              weights=weights, device=device, allow_unusual_mpp=allow_unusual_mpp)
    else:
        given = (("--mpp", mpp), ("--pitch-um", pitch_um), ("--genes", genes), ("--weights", weights), ("--device", None if device == "auto" else device))
        only_slide = [flag for flag, value in given if value is not None]
        if only_slide:
            verb = "applies" if len(only_slide) == 1 else "apply"
            raise ConfigError(f"{', '.join(only_slide)} {verb} only to predict --slide; cached samples keep the settings they were "
                              "extracted with, and their heads run on the head's own device.")
        if cache is None:
            raise ConfigError("predict needs --cache (cached samples) or --slide (a new image).")
        _existing_cache(cache)
        paths = predict_cache(model_dir, cache, out, samples=_csv(samples, "--samples"), retrieval=retrieval)
    for path in paths:
        console.print(f"predict: wrote {path}")


# ------------------------------------------------------------------------------------------ evaluate
@app.command()
def evaluate(
    pred: Path = typer.Argument(..., help="A prediction .h5ad or a folder of them (from `genedml predict`)."),
    data: Path = typer.Option(..., "--data", help="The dataset with measured expression."),
    out: Path = typer.Option(..., "--out", help="Where to write metrics.json, per-gene CSV and figures."),
    model_dir: Optional[Path] = typer.Option(None, "--model", help="Model dir (default: the one recorded in the predictions)."),
    mpp: Optional[float] = MppOpt,
    samples_table: Optional[Path] = SamplesTableOpt,
    allow_unusual_mpp: bool = UnusualMppOpt,
) -> None:
    """Score predictions against measured expression: PCC (ACG/HEG/HVG/HPG), MSE, MAE; figures."""
    from genedml.evaluate import evaluate_dir

    _check_mpp(mpp, allow_unusual_mpp)
    _out_dir(out)

    metrics = evaluate_dir(pred, data, out, model_dir=model_dir, read_kwargs=dict(mpp=mpp, samples_table=samples_table))
    console.print(json.dumps(metrics["summary"], indent=2))
    console.print(f"evaluate: wrote {out / 'metrics.json'}")


# ------------------------------------------------------------------------------------------------ cv
@app.command()
def cv(
    data: Path = typer.Argument(..., help="Dataset folder."),
    cache: Path = typer.Option(..., "--cache", help="Feature cache of all samples."),
    out: Path = typer.Option(..., "--out", help="Output directory (folds, predictions, summary)."),
    by: str = typer.Option("patient", help="patient | sample (leave one group out)."),
    model: list[str] = typer.Option(["genedml"], "--model", help="Repeat to compare heads on identical folds."),
    samples: Optional[str] = typer.Option(None, help="Restrict to these sample ids."),
    test_samples: Optional[str] = typer.Option(None, help="A single fixed test split instead of leave-one-out (comma-separated)."),
    retrieve_k: Optional[int] = typer.Option(None, "--retrieve-k", help="Also score retrieval predictions with K neighbours."),
    blend: float = typer.Option(1.0, help="Retrieval blend weight when --retrieve-k is given."),
    genes: int = typer.Option(250, help="Panel size."),
    smooth: bool = typer.Option(False, help="3x3 smoothing of targets."),
    epochs: int = typer.Option(200, help="Maximum epochs."),
    seeds: str = typer.Option("2021", help="Comma-separated seeds (neural heads are run once per seed)."),
    ablation: list[str] = typer.Option([], "--ablation", help=ABLATION_HELP),
    head_option: list[str] = typer.Option([], "--head-option", help="Any head setting as KEY=VALUE for every fit (repeatable)."),
    batch_size: int = typer.Option(512, help="Training batch size."),
    lr: float = typer.Option(1e-4, help="Adam learning rate."),
    mpp: Optional[float] = MppOpt,
    samples_table: Optional[Path] = SamplesTableOpt,
    allow_unusual_mpp: bool = UnusualMppOpt,
    resume: bool = ResumeOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Leave-one-group-out cross-validation of one or more heads on the same cache and folds."""
    from genedml.cv import CVSettings, run_cv

    _check_mpp(mpp, allow_unusual_mpp)
    _existing_cache(cache)
    _out_dir(out)
    _retrieval_flags_need_k(retrieve_k, ("--blend", blend, 1.0))

    options = parse_key_values(head_option)
    _refuse_conflicts({"batch_size": batch_size, "lr": lr}, options)
    settings = CVSettings(
        by=by, models=model, ablations=ablation, samples=_csv(samples, "--samples"), test_samples=_csv(test_samples, "--test-samples"), genes=genes, smooth=smooth,
        epochs=epochs, seeds=_seeds(seeds), retrieve_k=retrieve_k, blend=blend,
        head={"batch_size": batch_size, "lr": lr, **options},
    )
    summary = run_cv(data, cache, out, settings, read_kwargs=dict(mpp=mpp, samples_table=samples_table), resume=resume)
    console.print(summary["markdown"])


# --------------------------------------------------------------------------------------------- bench
bench_app = typer.Typer(help="Published evaluation protocols, one command each, on a feature cache.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("hest")
def bench_hest(
    bench_dir: Path = typer.Argument(..., help="HEST's benchmark folder (<TASK>/splits, adata, patches, var_50genes.json) or one task folder."),
    cache: Path = typer.Option(..., "--cache", help="Feature cache of the benchmark's samples (same sample ids)."),
    out: Path = typer.Option(..., "--out", help="Where to write dataset_results.json, hest_bench.md and per-split results."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Refuse a cache made with another backbone; names the rows."),
    model: list[str] = typer.Option(["ridge"], "--model", help="Heads to run on the same splits (repeatable); ridge is HEST's probe."),
    task: list[str] = typer.Option([], "--task", help="Only these tasks (repeatable, e.g. IDC)."),
    gene_list: str = typer.Option("var_50genes.json", help="Gene-list file inside each task folder."),
    epochs: int = typer.Option(200, help="Maximum epochs of neural heads."),
    seed: int = typer.Option(1, help="Random seed (HEST's default is 1)."),
    head_option: list[str] = typer.Option([], "--head-option", help="Any head setting as KEY=VALUE for every fit (repeatable)."),
) -> None:
    """HEST-Benchmark: its splits, genes, log1p targets, ridge probe and Pearson; every head on the same splits."""
    from genedml.bench.hest import HestBenchSettings, run_hest_bench

    settings = HestBenchSettings(models=model, tasks=task or None, gene_list=gene_list, backbone=backbone, seed=seed,
                                 epochs=epochs, head=parse_key_values(head_option))
    summary = run_hest_bench(bench_dir, cache, out, settings)
    console.print(summary["markdown"])


@bench_app.command("paper")
def bench_paper(
    data: Path = typer.Argument(..., help="The dataset folder the cache was made from (expression, and the authors' gene list if present)."),
    cache: Path = typer.Option(..., "--cache", help="Feature cache of the dataset's sections."),
    dataset: str = typer.Option(..., "--dataset", help="her2st | stnet | cscc."),
    out: Path = typer.Option(..., "--out", help="Where to write paper_summary.{md,json} and the cv files."),
    model: list[str] = typer.Option(["genedml"], "--model", help="Heads (repeatable): genedml, triplex, bleep, ridge, ridge-cv."),
    fold: list[int] = typer.Option([], "--fold", help="Only these folds (0-based, the authors' order; repeatable)."),
    gene_list: Optional[Path] = typer.Option(None, help="The authors' gene list (.npy, .json or text; default: DATA/genes_<dataset>.npy when present)."),
    epochs: int = typer.Option(200, help="Maximum epochs."),
    seeds: str = typer.Option("2021", help="Comma-separated seeds (neural heads are run once per seed)."),
    head_option: list[str] = typer.Option([], "--head-option", help="Any head setting as KEY=VALUE for every fit (repeatable)."),
    mpp: Optional[float] = MppOpt,
    samples_table: Optional[Path] = SamplesTableOpt,
    resume: bool = ResumeOpt,
) -> None:
    """Gene-DML / TRIPLEX protocol: the authors' patient folds, targets and per-slide PCC (ACG/HEG/HVG/HPG)."""
    from genedml.bench.paper import PaperSettings, run_paper

    settings = PaperSettings(dataset=dataset, models=model, folds=fold or None, gene_list=gene_list, epochs=epochs,
                             seeds=_seeds(seeds), head=parse_key_values(head_option))
    summary = run_paper(data, cache, out, settings, read_kwargs=dict(mpp=mpp, samples_table=samples_table), resume=resume)
    console.print(summary["markdown"])


# ---------------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Path = typer.Option(Path("genedml-demo"), "--out", help="Where the demo writes everything."),
    data: Optional[Path] = typer.Option(None, "--data", help="Run the chain on a real dataset folder instead of synthetic tissue."),
    backbone: str = typer.Option("tiny-cnn", help="Backbone for the demo (random-init)."),
    epochs: int = typer.Option(30, help="Training epochs of the Gene-DML head."),
    small: bool = typer.Option(False, help="A smaller, faster demo (used by the tests)."),
) -> None:
    """Synthetic tissue → extract → fit → predict (regression and retrieval) → evaluate → report."""
    from genedml.demo import run_demo

    report = run_demo(out, data=data, backbone=backbone, epochs=epochs, small=small)
    console.print(report)


# ---------------------------------------------------------------------------------------------- entry
COMMANDS_WITH_CONFIG = {"extract", "fit", "predict", "cv"}


def _invoked_command(argv: list[str]) -> str | None:
    """The subcommand of `argv`: the first word that is not an option (global options come first)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _config_path(argv: list[str]) -> Path | None:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a TOML file path.")
            return Path(argv[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def _flag_names(command: str) -> dict[str, str]:
    """{parameter name: its flag} of a subcommand, e.g. {"lambda_group": "--lambda-group"}."""
    group = typer.main.get_command(app)
    cmd = group.commands[command]  # type: ignore[attr-defined]
    names = {}
    for param in cmd.params:
        if param.name and param.name != "config":
            long = [o for o in param.opts if o.startswith("--")]  # arguments have none
            names[param.name] = long[0] if long else param.name.upper()
    return names


def _default_map(argv: list[str]) -> dict[str, dict[str, Any]] | None:
    """Read `--config FILE` (TOML) for the invoked command into click's default_map.

    Keys are the command's flag names (`lambda-group = 0.8`), flat or in a table named after the command
    (`[fit]`); tables for other commands are left to them. An unknown key is refused, naming the closest flag.
    """
    path = _config_path(argv)
    if path is None:
        return None
    try:
        values = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"Cannot read config {path}: {exc}") from exc
    command = _invoked_command(argv)
    if command not in COMMANDS_WITH_CONFIG:
        raise ConfigError(f"--config is accepted by {', '.join(sorted(COMMANDS_WITH_CONFIG))}, not by {command!r}.")
    flags = _flag_names(command)
    chosen: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            if key not in COMMANDS_WITH_CONFIG:
                raise ConfigError(f"{path}: unknown table [{key}]; tables are named after commands: {', '.join(sorted(COMMANDS_WITH_CONFIG))}.")
            if key == command:
                chosen.update(value)
        else:
            chosen[key] = value
    for key in chosen:
        name = key.replace("-", "_")
        if name not in flags:
            wanted = "--" + key.replace("_", "-")
            close = difflib.get_close_matches(wanted, flags.values(), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r} (key {close[0].lstrip('-')!r})?" if close else ""
            raise ConfigError(f"{path}: unknown key {key!r} for `genedml {command}`{hint} See `genedml {command} --help` for its flags.")
    repeatable = _repeatable(command)
    return {command: {k.replace("-", "_"): _config_value(v, k.replace("-", "_") in repeatable) for k, v in chosen.items()}}


def _config_value(value: Any, repeatable: bool) -> Any:
    """A config value as click takes it. A repeatable flag takes a TOML list, and one value written bare
    (`model = "ridge"`) is a list of one, where click would say only "Value must be an iterable". Any other
    flag given a list (`samples = ["C2", "C3"]`) gets it comma-joined, as on the command line: click would pass
    the text "['C2', 'C3']" on as one id."""
    if repeatable:
        return [value] if isinstance(value, str) else value
    if isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        return ",".join(str(v) for v in value)
    return value


def _repeatable(command: str) -> set[str]:
    """Parameter names of a subcommand's repeatable flags (`--model`, `--ablation`, `--head-option`, ...)."""
    group = typer.main.get_command(app)
    return {p.name for p in group.commands[command].params if getattr(p, "multiple", False) and p.name}  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> None:
    """Console entry point: turns GenedmlError into a one-paragraph message and exit status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command = typer.main.get_command(app)
        command.main(args=argv, prog_name="genedml", default_map=_default_map(argv), standalone_mode=True)
    except GenedmlError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise SystemExit(2) from None
    except SystemExit as done:
        if done.code in (0, None) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Under torchrun all work is finished and written (rank 0 waited for every rank and wrote the
            # manifest), but the C++ teardown of the gloo process group at interpreter exit can abort
            # ("terminate called without an active exception", seen once under load). Skip that teardown.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise
