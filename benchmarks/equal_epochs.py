"""Validation PCC of the Gene-DML default and of each ablation at the same epoch, from the curves cv saved.

An ablation that scores lower may lack a useful pathway, or may only have been stopped earlier: early stopping
picks each variant's epoch on its own. Every model directory that `genedml cv` or `accuracy_her2st.py` writes
keeps its training curve (`curve.json`: the validation PCC of the kept weights after every epoch), so the two
can be compared at one epoch without training again. The epoch used is the earlier of the two selected
epochs, which both runs reached. Validation numbers only: the test numbers stay in `cv_runs.json`.

    python benchmarks/equal_epochs.py OUT_DIR [OUT_DIR ...] [--json FILE]

OUT_DIR: an `--out` of `accuracy_her2st.py` or `genedml cv`; every `models/FOLD/VARIANT/seedS/curve.json`
below it of the default or an ablation is read (other heads of the same run, e.g. ridge, are skipped). A
(fold, variant, seed) found under two OUT_DIRs is refused: pass each run once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from genedml.ablations import ABLATIONS
from genedml.cv import Variant, model_dir_name
from genedml.jsonio import write_json

DEFAULT = model_dir_name(Variant("genedml", "genedml"))
# cv's folder name of each ablation -> its row label in cv's tables ("genedml___group" -> "genedml − group")
LABELS = {model_dir_name(Variant(a.label, "genedml")): a.label for a in ABLATIONS.values()}
# Only these are read: other heads in the same run (ridge, bleep, ...) are not Gene-DML ablations, and ridge's
# curve.json has no epochs.
COMPARED = {DEFAULT, *LABELS}


def read_curves(out_dirs: list[Path]) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(fold, variant directory, seed directory) -> the curve.json of that run, over every OUT_DIR."""
    curves: dict[tuple[str, str, str], dict[str, Any]] = {}
    where: dict[tuple[str, str, str], Path] = {}
    for out in out_dirs:
        found = [p for p in sorted(out.glob("**/models/*/*/seed*/curve.json")) if p.parent.parent.name in COMPARED]
        if not found:
            raise SystemExit(f"no models/FOLD/VARIANT/seedS/curve.json of the Gene-DML default or an ablation under {out}")
        for path in found:
            seed_dir = path.parent
            key = (seed_dir.parent.parent.name, seed_dir.parent.name, seed_dir.name)
            if key in curves:
                raise SystemExit(f"{'/'.join(key)} is under both {where[key]} and {path}: pass each run once")
            try:
                curve = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise SystemExit(f"cannot read {path}: {exc}") from exc
            if not isinstance(curve, dict) or not isinstance(curve.get("epochs"), list) or not isinstance(curve.get("best_epoch"), int):
                raise SystemExit(f"{path} is not a training curve (needs an 'epochs' list and an integer 'best_epoch')")
            curves[key], where[key] = curve, path
    return curves


def val_at(curve: dict[str, Any], epoch: int) -> float:
    """Validation PCC after `epoch` (by the epoch number each entry records, not its position)."""
    for entry in curve["epochs"]:
        if entry.get("epoch") == epoch:
            if entry.get("val_pcc") is None:
                raise SystemExit(f"epoch {epoch} of a curve has no val_pcc (trained without validation?)")
            return float(entry["val_pcc"])
    raise SystemExit(f"a curve has no epoch {epoch}")


def compare(curves: dict[tuple[str, str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ablation run that has a default run on the same fold and seed."""
    rows = []
    for (fold, variant, seed), curve in sorted(curves.items()):
        default = curves.get((fold, DEFAULT, seed))
        if variant == DEFAULT or default is None:
            continue
        epoch = min(curve["best_epoch"], default["best_epoch"])
        val_default, val_ablation = val_at(default, epoch), val_at(curve, epoch)
        rows.append({"fold": fold, "seed": seed, "variant": LABELS[variant], "epoch": epoch,
                     "selected_default": default["best_epoch"], "selected_ablation": curve["best_epoch"],
                     "val_default": round(val_default, 4), "val_ablation": round(val_ablation, 4),
                     "default_minus_ablation": round(val_default - val_ablation, 4)})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ablation: pairs, mean and SD of default − ablation at the common epoch, pairs where the default leads."""
    out = {}
    for variant in sorted({r["variant"] for r in rows}):
        diffs = [r["default_minus_ablation"] for r in rows if r["variant"] == variant]
        out[variant] = {"pairs": len(diffs), "mean": round(statistics.mean(diffs), 4),
                        "sd": round(statistics.stdev(diffs), 4) if len(diffs) > 1 else None,
                        "default_ahead": sum(d > 0 for d in diffs)}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dirs", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows and the summary here")
    args = ap.parse_args(argv)
    rows = compare(read_curves(args.out_dirs))
    if not rows:
        raise SystemExit("no ablation run has a default run on the same fold and seed")
    print("| fold | seed | variant | epoch (selected: default / ablation) | val default | val ablation | default − ablation |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['fold']} | {r['seed']} | {r['variant']} | {r['epoch']} ({r['selected_default']} / {r['selected_ablation']}) "
              f"| {r['val_default']:.4f} | {r['val_ablation']:.4f} | {r['default_minus_ablation']:+.4f} |")
    summary = summarise(rows)
    for variant, s in summary.items():
        print(f"{variant}: {s['pairs']} pairs, default − ablation {s['mean']:+.4f} (SD {s['sd']}), default ahead in {s['default_ahead']}")
    if args.json is not None:
        write_json(args.json, {"command": " ".join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                               "out_dirs": [str(p) for p in args.out_dirs], "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
