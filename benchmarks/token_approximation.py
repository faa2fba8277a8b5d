"""How well compact local-token caches (cls, 2x2, 4x4) approximate the full token sequence (issue 11, part 2).

From one `--local-tokens all` cache (CLS + every patch token of a ViT) the compact layouts are derived in
memory with the extractor's own pooling (CLS, then the mean of each cell of a k x k partition of the
patch-token map, row-major) and the `local_token_weights` the extractor would record. Four steps:

    # 0. the cache (random-init ViT-S/16; ≈ 10-20 min on 2 CPU cores)
    genedml extract ../shared/data/her2st --backbone timm:vit_small_patch16_224 --random-init \\
        --local-tokens all --samples-table benchmarks/her2st_samples.csv --cache benchmarks/work/cache_vits_all
    # 1. derived 4x4 == a real 4x4 extraction of one section (extracted alone into a small cache)
    genedml extract ../shared/data/her2st --samples C3 --scales local --backbone timm:vit_small_patch16_224 \\
        --random-init --local-tokens 4x4 --samples-table benchmarks/her2st_samples.csv \\
        --cache benchmarks/work/cache_vits_4x4_C3
    python benchmarks/token_approximation.py verify --cache benchmarks/work/cache_vits_all \\
        --real benchmarks/work/cache_vits_4x4_C3 --sample C3 --spots 5
    # 2. same head weights, different layouts: relative error of f and of the predictions on C3
    python benchmarks/token_approximation.py approx --cache benchmarks/work/cache_vits_all
    # 3. accuracy after training: derived caches written next to the all cache (`derive`, also done by
    #    `fit`), then benchmarks/small_cohort.py per layout and ridge-cv on the all cache
    python benchmarks/token_approximation.py derive --cache benchmarks/work/cache_vits_all
    python benchmarks/token_approximation.py fit --cache benchmarks/work/cache_vits_all [--epochs 40]
    # cache bytes per spot and recorded extraction seconds (e.g. also one section extracted per layout)
    python benchmarks/token_approximation.py sizes --cache benchmarks/work/cache_vits_all OTHER_CACHE...

Results are JSON files in benchmarks/results/token_approximation/ (verify.json, approx.json, fit.json).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genedml.backbones.token_cells import pool_cells
from genedml.cache.schema import ARRAYS, LOCAL, LOCAL_AUG, as_strings
from genedml.cache.store import FeatureCache
from genedml.extract.runner import TOKEN_GRIDS, local_token_weights
from genedml.heads.features import SpotFeatures
from genedml.heads.gene_dml import SCALES

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "token_approximation"
DATA = HERE.parent.parent / "shared" / "data" / "her2st"
SAMPLES_TABLE = HERE / "her2st_samples.csv"
CPU_SIZES: dict[str, Any] = {"dim": 128, "neighbor_depth": 1, "neighbor_mlp_ratio": 1.0, "global_depth": 2,
                             "global_mlp_ratio": 1.0}
LAYOUTS = ("all", "4x4", "2x2", "cls")


# ------------------------------------------------------------------------------------------ derivation
def derive_local(local_all: np.ndarray, layout: str) -> np.ndarray:
    """The `layout` local tokens (N, 1 + k², D) from `all` tokens (N, 1 + h·w, D), as the extractor pools them.

    Token 0 (CLS for a ViT with CLS pooling) is kept; the h x w patch-token map (row-major in the cache) is
    split into k x k cells and averaged per cell with `token_cells.pool_cells` (the extractor's call in
    `TimmEncoder.tokens`), flattened row-major. Computed in float32, returned in the input dtype (the
    extractor pools float32 tokens and then stores them in the cache dtype, so the two agree within one
    rounding of that dtype). Works on (N, 8, T, D) dihedral views too.
    """
    grid = TOKEN_GRIDS[layout]
    if grid < 0:
        return local_all
    lead, (tokens, dim) = local_all.shape[:-2], local_all.shape[-2:]
    side = round(float(np.sqrt(tokens - 1)))
    if side * side != tokens - 1:
        raise ValueError(f"{tokens - 1} patch tokens are not a square map")
    x = torch.from_numpy(np.ascontiguousarray(local_all.reshape(-1, tokens, dim), dtype=np.float32))
    parts = [x[:, :1]]
    if grid > 0:
        fmap = x[:, 1:].transpose(1, 2).reshape(len(x), dim, side, side)  # as TimmEncoder.tokens builds it
        parts.append(pool_cells(fmap, grid))
    out = torch.cat(parts, 1).numpy().astype(local_all.dtype)
    return out.reshape(*lead, out.shape[1], dim)


def derived_weights(layout: str, native_tokens: int) -> np.ndarray:
    """The `local_token_weights` attribute the extractor records for `layout` (its own function)."""
    return np.asarray(local_token_weights(TOKEN_GRIDS[layout], native_tokens), dtype=np.float32)


def derive_features(feats: SpotFeatures, layout: str) -> SpotFeatures:
    """`feats` (an `all` layout) with the local tokens and weights of `layout`; everything else shared."""
    native = feats.local.shape[1] - 1
    return SpotFeatures(
        local=derive_local(feats.local, layout), slide=feats.slide, grid=feats.grid, sample_ids=feats.sample_ids,
        barcodes=feats.barcodes, tiles=feats.tiles, neighbor_index=feats.neighbor_index,
        neighbor_mask=feats.neighbor_mask, token_weights=derived_weights(layout, native),
        slide_tokens=feats.slide_tokens, slide_grid=feats.slide_grid, slide_pos=feats.slide_pos,
    )


# ------------------------------------------------------------------------------------------ helpers
def _load(cache: FeatureCache, ids: Sequence[str]) -> SpotFeatures:
    from genedml.spots import load_spot_features

    return load_spot_features(cache, list(ids), with_aug=False)


def _targets(ids_train: Sequence[str], ids: Sequence[str], feats: SpotFeatures, data: Path) -> np.ndarray:
    """Targets as `genedml fit` builds them with its defaults (250 genes by mean on the training samples)."""
    from genedml.data import read_samples
    from genedml.fit import FitSettings
    from genedml.targets import fit_targets, targets_at

    d = FitSettings()
    samples = {s.sample_id: s for s in read_samples(data, samples=sorted(set(ids_train) | set(ids)), samples_table=SAMPLES_TABLE)}
    spec = fit_targets([samples[s] for s in ids_train], n_genes=d.genes, select=d.gene_select,
                       normalize_over=d.normalize_over, log=d.log, smooth=d.smooth)
    return np.concatenate([targets_at(samples[s], feats.barcodes[feats.slide == i], spec) for i, s in enumerate(ids)])


def _truth(spec: Any, test: str, feats: SpotFeatures, data: Path) -> np.ndarray:
    """Measured targets of `test` under a fitted model's target spec, in the order of `feats`."""
    from genedml.data import read_samples
    from genedml.targets import targets_at

    sample = read_samples(data, samples=[test], samples_table=SAMPLES_TABLE)[0]
    return targets_at(sample, feats.barcodes, spec)


def _relative(x: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Per-spot ‖x − ref‖ / ‖ref‖ over the rows (spots): median, mean, 90th percentile, max."""
    err = np.linalg.norm(x - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    return {"median": float(np.median(err)), "mean": float(err.mean()), "p90": float(np.quantile(err, 0.9)),
            "max": float(err.max())}


def _errors(x: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Relative error as asked, plus the same on spot-centred rows (a shift common to every spot of the
    slide removed: what a trained head could absorb in a bias) and the mean over dimensions of the
    across-spot Pearson r between x and ref."""
    xc, rc = x - x.mean(0), ref - ref.mean(0)
    denom = np.linalg.norm(xc, axis=0) * np.linalg.norm(rc, axis=0)
    r = (xc * rc).sum(0) / np.where(denom > 0, denom, np.nan)
    return {**_relative(x, ref), "centred": _relative(xc, rc), "mean_dim_pearson": float(np.nanmean(r))}


@contextlib.contextmanager
def weighting(head: Any, on: bool) -> Iterator[None]:
    """The head's `local_token_weighting` switched for the block (same weights either way)."""
    model = head._model()
    before = model.cfg
    model.cfg = dataclasses.replace(before, local_token_weighting=on)
    try:
        yield
    finally:
        model.cfg = before


def _write(name: str, record: dict[str, Any]) -> Path:
    from genedml.jsonio import jsonable

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(jsonable(record), indent=2) + "\n")
    print(json.dumps(jsonable(record))[:4000])
    return path


def _provenance(cache: FeatureCache) -> dict[str, Any]:
    cmd = ["git", "-C", str(HERE), "log", "-1", "--format=%H %s"]
    git = subprocess.run(cmd, check=False, capture_output=True, text=True).stdout.strip()
    return {"cache": str(cache.root), "backbone": cache.settings.get("backbone"), "weights": cache.settings.get("weights"),
            "local_tokens": cache.settings.get("local_tokens"), "commit": git, "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_avg": os.getloadavg()}


# ------------------------------------------------------------------------------------------ steps
def verify(cache: FeatureCache, real: FeatureCache, sample: str, spots: int, layout: str) -> dict[str, Any]:
    """Derived `layout` tokens of the first `spots` spots of `sample` against a real extraction of it."""
    full = cache.read(sample, names=[LOCAL, "barcodes"])
    ref = real.read(sample, names=[LOCAL, "barcodes"])
    b_full, b_ref = as_strings(full.arrays["barcodes"]), as_strings(ref.arrays["barcodes"])
    pick = np.arange(spots)
    rows = np.array([int(np.flatnonzero(b_full == b)[0]) for b in b_ref[pick]])
    derived = derive_local(full.arrays[LOCAL][rows], layout).astype(np.float32)
    stored = ref.arrays[LOCAL][pick].astype(np.float32)
    diff = np.abs(derived - stored)
    # Rounding bound: derived pools tokens already rounded to the cache dtype (each off by <= u |x_i|, so the
    # cell mean by <= u mean|x_i|), then derived and real are each rounded once (<= u |value| each), plus
    # the absolute spacing of subnormals. u = unit roundoff of the cache dtype (2^-11 for float16).
    dtype = full.arrays[LOCAL].dtype
    u = float(np.finfo(dtype).eps) / 2
    mean_abs = derive_local(np.abs(full.arrays[LOCAL][rows].astype(np.float32)), layout)
    bound = u * (mean_abs + np.abs(derived) + np.abs(stored)) + float(np.finfo(dtype).smallest_subnormal)
    weights_real = ref.attrs.get("local_token_weights")
    weights_derived = derived_weights(layout, full.arrays[LOCAL].shape[1] - 1).tolist()
    record = {
        "provenance": _provenance(cache), "real_cache": str(real.root), "sample": sample, "layout": layout,
        "spots": b_ref[pick].tolist(), "shape_derived": list(derived.shape), "shape_real": list(stored.shape),
        "max_abs_diff": float(diff.max()), "max_rel_diff": float((diff / np.maximum(np.abs(stored), 1e-3)).max()),
        "max_abs_value": float(np.abs(stored).max()), "unit_roundoff": u,
        "within_rounding_bound": bool((diff <= bound).all()), "fraction_within_bound": float((diff <= bound).mean()),
        "max_diff_over_bound": float((diff / bound).max()),
        "exactly_equal_fraction": float((diff == 0).mean()),
        "weights_equal": weights_real == weights_derived, "weights_real": weights_real,
        "dtype": str(dtype),
    }
    return record


def approx(cache: FeatureCache, data: Path, train: Sequence[str], test: str, seed: int,
           trained: Sequence[Path]) -> dict[str, Any]:
    """Part a: one seeded head per size (input and target scalers fitted on the train samples' `all`
    features by the head's own fit, one pass = 2 optimiser steps), eval mode; f and predictions on `test`
    for every layout, local_token_weighting on and off. Also any trained model dirs given."""
    from genedml.heads.gene_dml import GeneDMLHead, GeneDMLSettings

    feats_train = _load(cache, train)
    y_train = _targets(train, train, feats_train, data)
    feats_test = _load(cache, [test])
    layouts = {name: derive_features(feats_test, name) for name in LAYOUTS}
    sizes = {"cpu": CPU_SIZES, "paper": {}}
    record: dict[str, Any] = {"provenance": _provenance(cache), "train": list(train), "test": test,
                              "n_test_spots": len(feats_test), "seed": seed, "heads": {}}
    heads: dict[str, Any] = {}
    for size, opts in sizes.items():
        start = time.perf_counter()
        # The authors' three scales: the local patch's share of f is the question here.
        settings = GeneDMLSettings(**opts, scales=SCALES, encoder_dim=0, seed=seed, epochs=1, min_epoch_steps=1, device="cpu")
        head = GeneDMLHead(settings).fit(feats_train, y_train)
        heads[size] = (head, {"settings": opts or "defaults (paper sizes)",
                              "init": "seeded, one fit pass on the train samples' all features (2 optimiser steps)",
                              "fit_seconds": round(time.perf_counter() - start, 1)})
    truth = None
    for model_dir in trained:
        from genedml.model_dir import HEAD_DIR, TARGETS
        from genedml.targets import TargetSpec

        head = GeneDMLHead.load(Path(model_dir) / HEAD_DIR)
        head.model.to("cpu")
        spec = TargetSpec.from_json((Path(model_dir) / TARGETS).read_text())
        truth = _truth(spec, test, feats_test, data)
        heads[f"trained:{Path(model_dir).name}"] = (head, {"model_dir": str(model_dir), "truth": truth})
    for key, (head, info) in heads.items():
        model = head._model()
        start = time.perf_counter()
        out: dict[str, dict[str, np.ndarray]] = {}
        for name, feats in layouts.items():
            for on in (True, False):
                with weighting(head, on):  # one pass: f and pred (the standardised target space) side by side
                    both = head._batches(feats, lambda b, m=model: torch.cat([(o := m(b))["f"], o["pred"]], 1))
                width = model.cfg.dim
                out[f"{name}|{'weighted' if on else 'unweighted'}"] = {"f": both[:, :width], "pred": both[:, width:]}
        ref = out["all|weighted"]
        errors = {k: {"f": _errors(v["f"], ref["f"]), "pred": _errors(v["pred"], ref["pred"])}
                  for k, v in out.items() if k != "all|weighted"}
        # spot-to-spot spread of the reference, for scale: a layout error near this is as large as the signal
        spread = {k: float(np.median(np.linalg.norm(ref[k] - ref[k].mean(0), axis=1) / np.linalg.norm(ref[k], axis=1)))
                  for k in ("f", "pred")}
        truth = info.pop("truth", None)
        if truth is not None:  # per-gene PCC is unchanged by the per-gene target scaling: pred as is
            from genedml.metrics import mean_gene_pcc

            info["test_pcc_acg_by_input_layout"] = {k: float(mean_gene_pcc(v["pred"], truth)) for k, v in out.items()}
        record["heads"][key] = {**info, "relative_error_vs_all": errors,
                                "reference_spread_median": spread, "eval_seconds": round(time.perf_counter() - start, 1)}
    # the cells partition the patch tokens, so their size-weighted mean is the mean of all patch tokens
    side = round(float(np.sqrt(feats_test.local.shape[1] - 1)))
    patches = np.asarray(feats_test.local[:, 1:], np.float32)
    true_mean = patches.mean(1)
    for grid in (2, 4):
        cells = derive_local(feats_test.local, f"{grid}x{grid}")[:, 1:].astype(np.float32)
        sizes = np.asarray(derived_weights(f"{grid}x{grid}", side * side)[1:])
        record[f"cells_{grid}x{grid}"] = {
            "cell_sizes": sorted(set(sizes.astype(int).tolist())),
            "weighted_mean_of_cells_vs_mean_of_patches": _relative((cells * sizes[:, None]).sum(1) / sizes.sum(), true_mean),
        }
    return record


def write_derived(cache: FeatureCache, layout: str, root: Path) -> FeatureCache:
    """A cache at `root` identical to `cache` except its local tokens and weights (layout `layout`)."""
    settings = {**cache.settings, "local_tokens": layout, "derived_from": str(cache.root.resolve()),
                "derivation": "benchmarks/token_approximation.py derive_local (token_cells.pool_cells of the all tokens)"}
    settings.pop("format_version", None)
    out = FeatureCache(root, settings)
    for sample in cache.samples():
        if out.is_complete(sample):
            continue
        src = cache.read(sample)
        native = src.arrays[LOCAL].shape[1] - 1
        with out.writing(sample) as writer:
            for name in ARRAYS:
                if name not in src.arrays:
                    continue
                value = src.arrays[name]
                if name in (LOCAL, LOCAL_AUG):
                    value = derive_local(value, layout)
                elif value.dtype.kind not in "biuf":
                    value = as_strings(value)
                writer.write(name, value)
            attrs = {k: v for k, v in src.attrs.items() if k not in ("complete", "completed", "integrity")}
            attrs["local_token_weights"] = derived_weights(layout, native).tolist()
            writer.attrs(**attrs)
    return out


def sizes(caches: Sequence[Path]) -> dict[str, Any]:
    """Bytes on disk per spot (whole sample groups and the `local` array alone) and the extraction seconds
    each sample recorded, per cache."""
    rows = []
    for root in caches:
        cache = FeatureCache(root)
        spots = total = local = 0
        seconds = 0.0
        for sample in cache.samples():
            attrs = cache.sample_attrs(sample)
            spots += int(attrs["n_spots"])
            seconds += float(attrs.get("seconds") or 0.0)
            files = [p for p in cache.sample_dir(sample).rglob("*") if p.is_file()]
            total += sum(p.stat().st_size for p in files)
            local += sum(p.stat().st_size for p in files if p.relative_to(cache.sample_dir(sample)).parts[0] == LOCAL)
        shape = cache.array_shapes(cache.samples()[0])[LOCAL]
        measured = seconds and not cache.settings.get("derived_from")  # a derived cache copies its source's
        rows.append({"cache": str(root), "local_tokens": cache.settings.get("local_tokens"),
                     "derived_from": cache.settings.get("derived_from"), "scales": cache.settings.get("scales"),
                     "samples": cache.samples(), "spots": spots, "local_shape_per_spot": list(shape[0][1:]),
                     "local_raw_bytes_per_spot": int(np.prod(shape[0][1:])) * shape[1].itemsize,
                     "bytes_per_spot_on_disk": round(total / spots), "local_bytes_per_spot_on_disk": round(local / spots),
                     "extraction_seconds_recorded": round(seconds, 1),
                     "spots_per_second": round(spots / seconds, 2) if measured else None})
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_avg": os.getloadavg(), "caches": rows}


def derived_root(cache: FeatureCache, layout: str) -> Path:
    """Where the derived cache of `layout` lives: next to the `all` cache."""
    return cache.root.parent / f"{cache.root.name}__{layout}"


def fit(cache: FeatureCache, epochs: int | None, layouts: Sequence[str], ridge: bool, out: Path) -> dict[str, Any]:
    """Part b: `small_cohort.py` (train C2,C4,C5 / validate C6 / test C3, seed 2021, CPU sizes) per layout."""
    caches = {"all": cache}
    for layout in layouts:
        if layout != "all":
            caches[layout] = write_derived(cache, layout, derived_root(cache, layout))
    opts = [f"{k}={json.dumps(v)}" for k, v in {**CPU_SIZES, "scales": list(SCALES), "encoder_dim": 0}.items()] + ([f"epochs={epochs}"] if epochs else [])
    runs = [(layout, "genedml", opts) for layout in layouts] + ([("all", "ridge-cv", [])] if ridge else [])
    record: dict[str, Any] = {"provenance": _provenance(cache), "epochs_cap": epochs, "runs": []}
    for layout, model, run_opts in runs:
        tag = f"{model}_{layout}"
        cmd = [sys.executable, str(HERE / "small_cohort.py"), "--cache", str(caches[layout].root), "--model", model,
               "--out", str(out), "--tag", tag]
        for opt in run_opts:
            cmd += ["--opt", opt]
        start = time.perf_counter()
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr[-4000:])
            raise SystemExit(f"{tag} failed ({done.returncode})")
        line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
        run = {"layout": layout, "cache": str(caches[layout].root), "command": " ".join(cmd),
               "wall_seconds": round(time.perf_counter() - start, 1), **json.loads(line)}
        record["runs"].append(run)
        _write("fit.json", record)  # after each run: a partial record survives an interrupted study
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process (small_cohort runs keep theirs)")
    sub = ap.add_subparsers(dest="step", required=True)
    for name in ("verify", "derive", "approx", "fit", "sizes"):
        p = sub.add_parser(name)
        p.add_argument("--cache", type=Path, default=HERE / "work" / "cache_vits_all", help="the --local-tokens all cache")
        if name == "verify":
            p.add_argument("--real", type=Path, required=True, help="a real extraction of --sample in --layout")
            p.add_argument("--sample", default="C3")
            p.add_argument("--spots", type=int, default=5)
            p.add_argument("--layout", default="4x4")
        elif name == "sizes":
            p.add_argument("others", type=Path, nargs="*", help="more caches to measure")
        elif name == "derive":
            p.add_argument("--layouts", default="4x4,cls")
        elif name == "approx":
            p.add_argument("--data", type=Path, default=DATA)
            p.add_argument("--train", default="C2,C4,C5")
            p.add_argument("--test", default="C3")
            p.add_argument("--seed", type=int, default=2021)
            p.add_argument("--trained", type=Path, action="append", default=[],
                           help="also a fitted model dir (e.g. the fit step's genedml_all), repeatable")
        else:
            p.add_argument("--epochs", type=int, default=None, help="cap on epochs (same for every layout)")
            p.add_argument("--layouts", default="all,4x4,cls")
            p.add_argument("--no-ridge", action="store_true")
            p.add_argument("--out", type=Path, default=HERE / "work" / "token_approximation_models")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # a shared 2-core machine: one thread unless asked
    cache = FeatureCache(args.cache)
    if args.step == "verify":
        _write(f"verify_{args.layout}.json", verify(cache, FeatureCache(args.real), args.sample, args.spots, args.layout))
    elif args.step == "sizes":
        _write("sizes.json", sizes([args.cache, *args.others]))
    elif args.step == "derive":
        for layout in args.layouts.split(","):
            print(write_derived(cache, layout, derived_root(cache, layout)).root)
    elif args.step == "approx":
        _write("approx.json", approx(cache, args.data, args.train.split(","), args.test, args.seed, args.trained))
    else:
        fit(cache, args.epochs, args.layouts.split(","), not args.no_ridge, args.out)


if __name__ == "__main__":
    main()
