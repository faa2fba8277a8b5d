"""GPU check, training: mixed-precision (AMP) fits of the Gene-DML head on her2st, against fp32 on the same GPU.

Run by benchmarks/gpu_check.sh on a GPU machine; `--quick` is a dry run of every code path on a CPU (CPU head
sizes, two epochs, two folds). Parts:
  (a) the random-init ResNet18 cache of benchmarks/accuracy_her2st.py, extracted on the device (timed);
  (b) speed, one fit at a time: seconds per epoch of the default head (paper sizes) in fp32, fp16 (the
      default `precision=auto` on CUDA: autocast and a gradient scaler) and bf16, as (t(E) − t(1)) / (E − 1)
      so that data loading, k-means setup and the reference bank drop out (train C2–C5, validate on C6);
  (c) accuracy: leave one of C2–C6 out (accuracy_her2st.py's loso-C, seed 2021, every setting at its default)
      with `precision=auto` and `precision=fp32`, every fold and precision a process of its own, all at once;
      fits that are not done when the time budget ends are reported as such.
Writes OUT/gpu_train.json and OUT/gpu_train.md; each part that fails records its error and the next one runs.

    python benchmarks/gpu_train.py --data .gpu_data/her2st --out gpu_results --budget 240
    python benchmarks/gpu_train.py --data ../shared/data/her2st --out /tmp/gpu_dry --quick   # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# after the path insert: benchmarks/ is not a package
from gpu_extract_speed import run_section
from small_cohort import CPU_SIZES

from genedml.jsonio import write_json, write_text_atomic

BACKBONE = "timm:resnet18"
FOLDS = ("C2", "C3", "C4", "C5", "C6")


def build_cache(args: argparse.Namespace) -> dict[str, Any]:
    from accuracy_her2st import ensure_cache

    start = time.perf_counter()
    cache = ensure_cache(args.data, BACKBONE, None, args.work, HERE / "her2st_samples.csv")
    return {"backbone": BACKBONE, "cache": str(cache), "seconds": round(time.perf_counter() - start, 1)}


def speed(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Seconds per epoch of one fit at a time, per precision; fixed costs cancel in t(E) − t(1)."""
    from genedml.data import read_samples
    from genedml.fit import FitSettings, fit_model

    samples = {s.sample_id: s for s in read_samples(args.data, samples_table=HERE / "her2st_samples.csv")}
    sizes = CPU_SIZES if args.quick else {}
    long = 2 if args.quick else args.speed_epochs
    table: dict[str, Any] = {"epochs": [1, long], "train": ["C2", "C3", "C4", "C5"], "val": ["C6"], "precisions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions.split(","):
            row: dict[str, Any] = {}
            for epochs in (1, long):
                head = {**sizes, "epochs": epochs, "patience": 1000, "precision": precision, "device": args.device}
                settings = FitSettings(model="genedml", train_samples=["C2", "C3", "C4", "C5"], val_samples=["C6"], head=head)
                result = fit_model(cache, None, Path(tmp) / f"{precision}_{epochs}", settings, samples=samples)
                curve = json.loads(next((Path(tmp) / f"{precision}_{epochs}").rglob("curve.json")).read_text())
                row[f"seconds_{epochs}"] = round(result.seconds, 2)
                row["recorded_precision"] = curve["precision"]
                row["steps_per_epoch"] = curve["steps_per_epoch"]
                row[f"loss_{epochs}"] = curve["epochs"][-1]["loss"]
                row[f"val_pcc_{epochs}"] = curve["epochs"][-1]["val_pcc"]
            row["seconds_per_epoch"] = round((row[f"seconds_{long}"] - row["seconds_1"]) / (long - 1), 3)
            table["precisions"][precision] = row
            print(f"  speed {precision}: {row}", flush=True)
    fp32 = table["precisions"].get("fp32", {}).get("seconds_per_epoch")
    for row in table["precisions"].values():
        row["speedup_vs_fp32"] = round(fp32 / row["seconds_per_epoch"], 2) if fp32 and row["seconds_per_epoch"] > 0 else None
    return table


def accuracy(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """loso-C at the default settings, precision auto vs fp32: one process per fold and precision, all at once."""
    folds = FOLDS[:2] if args.quick else FOLDS
    runs, procs = {}, []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for precision in ("auto", "fp32"):
        for fold in folds:
            out = args.work / "accuracy" / f"{precision}_{fold}"
            cmd = [sys.executable, str(HERE / "accuracy_her2st.py"), "--data", str(args.data), "--work", str(args.work),
                   "--backbones", BACKBONE, "--splits", "loso-C", "--folds", fold, "--smooth", "off",
                   "--models", "genedml", "--ablations", "", "--seeds", str(args.seed), "--retrieve-k", "50",
                   "--head-option", f"precision={precision}", "--head-option", f"device={args.device}", "--out", str(out)]
            if args.quick:
                cmd += ["--epochs", "2"] + [a for k, v in CPU_SIZES.items() for a in ("--head-option", f"{k}={json.dumps(v)}")]
            log = open(args.work / f"accuracy_{precision}_{fold}.log", "w")  # noqa: SIM115 — closed once its process ends
            procs.append((precision, fold, out, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    runs["command_example"] = " ".join(procs[0][3].args)
    started = time.perf_counter()
    for precision, fold, out, proc, log in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        key = f"{precision}/{fold}"
        if proc.returncode != 0:
            tail = (args.work / f"accuracy_{precision}_{fold}.log").read_text()[-1500:]
            runs[key] = {"finished": False, "returncode": proc.returncode, "log_tail": tail}
            continue
        summary = json.loads((out / "results.json").read_text())["runs"][0]["summary"]
        row = next(r for r in summary["runs"] if r["variant"] == "genedml")
        curve = json.loads(next(out.rglob("curve.json")).read_text())
        runs[key] = {"finished": True, "pcc_acg": round(row["pcc_acg"], 4), "pcc_heg": round(row["pcc_heg"], 4),
                     "fit_seconds": row["fit_seconds"], "epochs_run": len(curve["epochs"]), "best_epoch": curve["best_epoch"],
                     "best_val_pcc": round(curve["best_val_pcc"], 4), "recorded_precision": curve["precision"]}
        retrieval = next((r for r in summary["runs"] if r["variant"] != "genedml"), None)
        if retrieval:
            runs[key]["pcc_acg_retrieval"] = round(retrieval["pcc_acg"], 4)
    runs["wall_seconds_all_at_once"] = round(time.perf_counter() - started, 1)
    for precision in ("auto", "fp32"):
        done = [runs[f"{precision}/{f}"]["pcc_acg"] for f in folds if runs[f"{precision}/{f}"].get("finished")]
        runs[f"{precision}_mean_pcc_acg"] = round(sum(done) / len(done), 4) if len(done) == len(folds) else None
    return runs


def _cell(run: dict[str, Any] | None, key: str) -> str:
    return str(run.get(key)) if run and run.get("finished") else "not done"


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# GPU training check ({results['date']}, {results['machine']})", ""]
    sp = results.get("speed", {})
    if "precisions" in sp:
        lines += ["| precision | recorded | s / epoch | vs fp32 | val PCC after the long fit |", "|---|---|---|---|---|"]
        val_key = f"val_pcc_{sp['epochs'][1]}"
        for p, r in sp["precisions"].items():
            lines.append(f"| {p} | {r['recorded_precision']} | {r['seconds_per_epoch']} | {r['speedup_vs_fp32']} | {r[val_key]:.4f} |")
    acc = results.get("accuracy", {})
    if "wall_seconds_all_at_once" in acc:
        lines += ["", "| fold | auto (fp16) PCC-ACG | fp32 PCC-ACG | best epoch auto / fp32 |", "|---|---|---|---|"]
        for f in FOLDS:
            a, b = acc.get(f"auto/{f}"), acc.get(f"fp32/{f}")
            if a is None:
                continue
            lines.append(f"| {f} | {_cell(a, 'pcc_acg')} | {_cell(b, 'pcc_acg')} | {_cell(a, 'best_epoch')} / {_cell(b, 'best_epoch')} |")
        lines.append(f"| mean | {acc['auto_mean_pcc_acg']} | {acc['fp32_mean_pcc_acg']} | |")
    for name in ("cache", "speed", "accuracy"):
        if isinstance(results.get(name), dict) and "error" in results[name]:
            lines.append(f"\n{name}: ERROR {results[name]['error']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import platform

    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st")
    ap.add_argument("--work", type=Path, default=None, help="caches and runs (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_results")))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="dry run on a CPU: CPU sizes, 2 epochs, 2 folds")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for the whole script; unfinished fits are reported")
    ap.add_argument("--speed-epochs", type=int, default=8)
    ap.add_argument("--precisions", default=None, help="for the speed part (default fp32,auto,bf16; fp32,auto with --quick)")
    ap.add_argument("--seed", type=int, default=2021)
    args = ap.parse_args(argv)
    deadline = time.perf_counter() + args.budget
    args.precisions = args.precisions or ("fp32,auto" if args.quick else "fp32,auto,bf16")
    args.work = args.work or Path(tempfile.mkdtemp(prefix="gpu_train_"))
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": f"{gpu}, {os.cpu_count()} CPUs",
                               "torch": torch.__version__, "python": platform.python_version(),
                               "command": " ".join([Path(sys.executable).name, *sys.argv]), "weights": "random-init (no pretrained weights)"}
    run_section(results, "cache", lambda: build_cache(args))
    if "error" not in results["cache"]:
        run_section(results, "speed", lambda: speed(args, Path(results["cache"]["cache"])))
        run_section(results, "accuracy", lambda: accuracy(args, deadline))
    write_json(args.out / "gpu_train.json", results)
    md = markdown(results)
    write_text_atomic(args.out / "gpu_train.md", md)
    print(md, flush=True)
    return 0 if all("error" not in results.get(k, {}) for k in ("cache", "speed", "accuracy")) else 1


if __name__ == "__main__":
    sys.exit(main())
