"""The speed table: every stage's figure as a ratio to, or beside, a reference measured in the same run.

    python benchmarks/speed.py --data ../shared/data/her2st --out benchmarks/results/speed

Stages (each in its own process so its peak memory is its own):
- extraction: benchmarks/extract_speed.py on her2st C3 (resnet18, ViT-S/16, random-init): extraction
  throughput / raw forward throughput, tiles encoded per spot (lattice vs exact), peak RSS;
- fit: seconds per epoch and per full fit of the heads on the her2st feature cache (train C2–C6, validate on
  C6), beside the ridge probe fitted in the same process as the reference;
- retrieval: benchmarks/retrieval_speed.py: predict-with-retrieval throughput / bare FAISS throughput, and
  BLEEP-style brute force / FAISS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The reduced Gene-DML/TRIPLEX sizes the CPU accuracy benchmark uses (RESULTS.md says so next to each number).
CPU_HEAD = {"dim": 128, "neighbor_depth": 1, "neighbor_mlp_ratio": 1.0, "global_depth": 2, "global_mlp_ratio": 1.0}


def fit_stage(cache: Path, data: Path, table: Path, epochs: int, out: Path) -> dict:
    """Fit ridge (reference), genedml at the paper's width and at width 128, and triplex; time each."""
    from genedml.fit import FitSettings, fit_model
    from genedml.heads.gene_dml import SCALES  # the genedml rows time the authors' model: three scales at width D

    rows = {}
    runs = [
        ("ridge (reference)", "ridge", {}, 512),
        ("genedml, paper sizes (width 512, batch 512)", "genedml", {"scales": SCALES, "encoder_dim": 0}, 512),
        ("genedml, CPU sizes (accuracy benchmark)", "genedml", {**CPU_HEAD, "scales": SCALES, "encoder_dim": 0}, 128),
        ("triplex, CPU sizes", "triplex", CPU_HEAD, 128),
        ("bleep", "bleep", {}, 128),
    ]
    for label, model, extra, batch in runs:
        head = {"epochs": epochs, "patience": epochs, "batch_size": batch, "lr": 1e-4, **extra} if model != "ridge" else {}
        fs = FitSettings(model=model, train_samples=["C2", "C3", "C4", "C5"], val_samples=["C6"], head=head)
        t0 = time.perf_counter()
        result = fit_model(cache, data, out / f"fit_{model}_{batch}", fs, read_kwargs={"samples_table": table})
        seconds = time.perf_counter() - t0
        n_epochs = len(result.history.get("epochs") or []) or None
        rows[label] = {
            "seconds_total": round(seconds, 2),
            "seconds_training": round(result.history.get("seconds", seconds), 2),
            "epochs": n_epochs,
            "seconds_per_epoch": round(result.history["seconds"] / n_epochs, 3) if n_epochs else None,
            "val_pcc": result.history.get("best_val_pcc"),
        }
    ref = rows["ridge (reference)"]["seconds_total"]
    for row in rows.values():
        row["ratio_to_ridge"] = round(row["seconds_total"] / ref, 1)
    return {"fit": rows, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_json(cmd: list[str], json_path: Path) -> dict:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(json_path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st")
    ap.add_argument("--cache", type=Path, default=HERE / "work" / "cache_timm_resnet18", help="her2st cache (accuracy_her2st.py makes it)")
    ap.add_argument("--samples-table", type=Path, default=HERE / "her2st_samples.csv")
    ap.add_argument("--epochs", type=int, default=5, help="epochs per timed fit (early stopping off)")
    ap.add_argument("--bank", type=int, default=100_000)
    ap.add_argument("--stages", default="extract,fit,retrieval")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "speed")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage == "fit":  # child process: isolated peak memory
        (args.out / "fit.json").write_text(json.dumps(fit_stage(args.cache, args.data, args.samples_table, args.epochs, args.out / "work"), indent=2))
        return
    py = sys.executable
    results = {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    stages = args.stages.split(",")
    if "extract" in stages:
        results["extract"] = run_json([py, str(HERE / "extract_speed.py"), "--data", str(args.data), "--samples", "C3",
                                       "--backbones", "timm:resnet18", "--batch-size", "64",
                                       "--threads", "2", "--repeats", "2", "--json", str(args.out / "extract.json")], args.out / "extract.json")
        # ViT-S/16 runs at ~10 img/s here: a smoke-sized run (64 spots) keeps the table under a few minutes.
        results["extract_vit_small_quick"] = run_json([py, str(HERE / "extract_speed.py"), "--data", str(args.data), "--samples", "C3",
                                                       "--backbones", "timm:vit_small_patch16_224", "--batch-size", "64", "--threads", "2",
                                                       "--quick", "--json", str(args.out / "extract_vit.json")], args.out / "extract_vit.json")
    if "fit" in stages:
        results["fit"] = run_json([py, __file__, "--stage", "fit", "--cache", str(args.cache), "--data", str(args.data),
                                   "--samples-table", str(args.samples_table), "--epochs", str(args.epochs), "--out", str(args.out)], args.out / "fit.json")
    if "retrieval" in stages:
        results["retrieval"] = run_json([py, str(HERE / "retrieval_speed.py"), "--bank", str(args.bank), "--queries", "2000",
                                         "--dim", "256", "--genes", "250", "--k", "50", "--repeats", "3", "--json", str(args.out / "retrieval.json")],
                                        args.out / "retrieval.json")
    (args.out / "speed.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str)[:4000])


if __name__ == "__main__":
    main()
