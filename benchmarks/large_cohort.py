"""Default settings at the large end: a synthetic cohort of many sections (issue "faithful and trainable", §3).

The small end (three her2st sections) is `small_cohort.py`. Here the cohort is `scale.py`'s synthetic one
(a spatially smooth latent field drives both the features and the expression through tanh, so there is a
learnable, partly non-linear signal), with many small sections: train on the first sections, select on the
next `--val` sections, test on the last `--test`. Every head is fitted with `genedml fit`'s defaults (the
paper's optimiser settings) plus `--opt` (by default the CPU sizes of the accuracy benchmark), and the rows
are scored like `small_cohort.py` (PCC-ACG per test section, then averaged). Prints and writes one JSON.

    python benchmarks/large_cohort.py --slides 300 --spots-per-slide 64 --dim 64 --out benchmarks/results/large_cohort

No biology: the features are synthetic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import scale  # noqa: E402  (benchmarks/scale.py: the synthetic cohort)
import small_cohort  # noqa: E402  (benchmarks/small_cohort.py: fit + score one head)
from genedml.ablations import ABLATIONS  # noqa: E402

ROWS = {  # row name → (model, extra head settings)
    "ridge-cv": ("ridge-cv", {}),
    "mlp": ("genedml", dict(ABLATIONS["mlp"].overrides)),  # the cv baseline row, the same settings
    "genedml": ("genedml", {}),
}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=300)
    ap.add_argument("--spots-per-slide", type=int, default=64)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--val", type=int, default=30, help="validation sections (after the training ones)")
    ap.add_argument("--test", type=int, default=30, help="test sections (the last ones)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--opt", action="append", default=None, help="head setting KEY=VALUE for the neural rows "
                    "(repeatable; default: the CPU sizes)")
    ap.add_argument("--seed", type=int, default=2021, help="the fits' seed (the cohort's is fixed: 0)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep-work", action="store_true")
    args = ap.parse_args(argv)
    rows = args.rows.split(",")
    if unknown := sorted(set(rows) - set(ROWS)):
        ap.error(f"unknown --rows {unknown}; choose from {sorted(ROWS)}")
    if args.slides < args.val + args.test + 1:
        ap.error("--slides must exceed --val + --test")
    opts = dict(small_cohort.CPU_SIZES) if args.opt is None else small_cohort.parse_opts(args.opt)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "work"
    if work.exists():
        shutil.rmtree(work)
    built = scale.build_cohort(work, args.slides * args.spots_per_slide, args.dim, args.spots_per_slide, genes=300,
                               mpp=0.25, seed=0)
    ids = built["samples"]
    train, val, test = ids[: -args.val - args.test], ids[-args.val - args.test: -args.test], ids[-args.test:]

    from genedml.cache.store import FeatureCache
    from genedml.data import read_samples

    cache = FeatureCache(built["cache"])
    samples = {s.sample_id: s for s in read_samples(built["data"])}
    record = {"command": " ".join(["python", "benchmarks/large_cohort.py", *(sys.argv[1:] if argv is None else argv)]),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "genedml_commit": scale.git_commit(),
              "machine": scale.machine(), "load_average_start": os.getloadavg(), "slides": args.slides,
              "spots_per_slide": args.spots_per_slide, "dim": args.dim,
              "split": {"train": len(train), "val": len(val), "test": len(test)}, "rows": {}}
    for row in rows:
        model, extra = ROWS[row]
        head = {} if model.startswith("ridge") else {**opts, **extra, "seed": args.seed}
        result = small_cohort.fit_and_score(cache, samples, model, head, train, val, test, work / "models" / row)
        result.pop("test")  # per-section scores: 30 rows of noise; the mean is what is compared
        record["rows"][row] = result
        print(json.dumps({"row": row, **result}), flush=True)
    record["load_average_end"] = os.getloadavg()
    (args.out / "large_cohort.json").write_text(json.dumps(record, indent=2))
    if not args.keep_work:
        shutil.rmtree(work)
    return record


if __name__ == "__main__":
    main()
