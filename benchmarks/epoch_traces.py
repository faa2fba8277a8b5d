"""Per-epoch test PCC of a neural head's last weights and of weight averages, on one her2st split.

Why RESULTS.md's "genedml 0.7" changed model selection: early stopping sees only a validation section, and
when every training section comes from one patient that section cannot show the model getting worse on a
new patient. This script trains one head (C2-C6 minus the test section, validation drawn with the seed as
`genedml fit` draws it) with `average_weights=false` and, after every epoch, scores on the test and the
validation section: the last weights, the running uniform mean of the epoch-end weights (what
`average_weights=true` keeps) and two exponential means (weight 0.5 and 0.2 on the newest epoch). Prints one
JSON line per epoch and writes them all to --out.

    python benchmarks/epoch_traces.py --cache benchmarks/work/cache_timm_resnet18 --seed 2023 --out traces.json
    python benchmarks/epoch_traces.py --cache benchmarks/work/cache_he-stats --test C3 --opt instance=false
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from genedml.cache.store import FeatureCache
from genedml.data import read_samples
from genedml.fit import known_patients, load_split, split_samples
from genedml.heads.registry import make_head
from genedml.metrics import mean_gene_pcc
from genedml.spots import load_spot_features
from genedml.targets import fit_targets, targets_at
from small_cohort import her2st_parser, parse_opts  # benchmarks/small_cohort.py (this script's folder is on sys.path)

SECTIONS = ["C2", "C3", "C4", "C5", "C6"]
AVERAGES = {"uniform": None, "ema0.5": 0.5, "ema0.2": 0.2}  # weight of the newest epoch (None: 1 / epochs)


def main() -> None:
    ap = her2st_parser(__doc__)
    ap.add_argument("--test", default="B4")
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--opt", action="append", default=[], help="genedml head setting KEY=VALUE (JSON values), repeatable")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    opts = parse_opts(args.opt)

    cache = FeatureCache(args.cache)
    pool = [s for s in SECTIONS if s != args.test]
    samples = {s.sample_id: s for s in read_samples(args.data, samples=pool + [args.test], samples_table=args.samples_table)}
    train_ids, val_ids = split_samples(cache.samples(), pool, None, 0.2, args.seed, patients=known_patients(cache, pool))
    spec = fit_targets([samples[s] for s in train_ids], n_genes=250, select="mean", gene_list=None,
                       normalize_over="panel", log="log1p", smooth=False)
    train, y_train = load_split(cache, samples, train_ids, spec)
    val, y_val = load_split(cache, samples, val_ids, spec)
    test = load_spot_features(cache, [args.test], with_aug=False)
    y_test = targets_at(samples[args.test], test.barcodes, spec)
    head = make_head("genedml", {**opts, "seed": args.seed, "average_weights": False})
    means: dict[str, list[torch.Tensor]] = {}
    rows: list[dict] = []

    def scores() -> tuple[float, float]:
        return mean_gene_pcc(head.predict(test), y_test), mean_gene_pcc(head.predict(val), y_val)

    @torch.no_grad()
    def after_epoch(epoch: int, parts: dict, val_pcc: float) -> None:
        params = list(head.model.parameters())
        current = [p.detach().clone() for p in params]
        row = {"epoch": epoch, "loss": parts["loss"], "val": val_pcc, "test": scores()[0]}
        for name, weight in AVERAGES.items():
            if name not in means:
                means[name] = [c.clone() for c in current]
            else:
                for m, c in zip(means[name], current):
                    m.lerp_(c, 1.0 / (epoch + 1) if weight is None else weight)
            for p, m in zip(params, means[name]):
                p.copy_(m)
            row[f"test_{name}"], row[f"val_{name}"] = scores()
        for p, c in zip(params, current):
            p.copy_(c)
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    start = time.perf_counter()
    head.fit(train, y_train, val, y_val, progress=after_epoch)
    args.out.write_text(json.dumps({"cache": str(args.cache), "test": args.test, "seed": args.seed, "opts": opts,
                                    "train": train_ids, "val": val_ids, "rows": rows,
                                    "seconds": round(time.perf_counter() - start, 1)}, indent=1))


if __name__ == "__main__":
    main()
