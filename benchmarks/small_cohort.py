"""One head on a fixed three-section split of her2st (default: train C2,C4,C5 / validate C6 / test C3).

The check behind RESULTS.md's "default settings on a small cohort": does `genedml fit` with a given head's
settings learn, and how does it compare with ridge-cv on the same cache and split? Prints one JSON line.

    python benchmarks/small_cohort.py --cache benchmarks/work/cache_timm_resnet18 --model genedml \\
        --opt dim=128 --opt neighbor_depth=1 --opt neighbor_mlp_ratio=1.0 --opt global_depth=2 --opt global_mlp_ratio=1.0
    python benchmarks/small_cohort.py --cache benchmarks/work/cache_timm_resnet18 --model ridge-cv

The caches are the ones `benchmarks/accuracy_her2st.py` builds (or `genedml extract ../shared/data/her2st
--backbone timm:resnet18 --random-init --augment dihedral --cache benchmarks/work/cache_timm_resnet18`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from genedml.cache.store import FeatureCache
from genedml.data import read_samples
from genedml.fit import FitSettings, fit_model
from genedml.metrics import mean_gene_pcc
from genedml.predict import Predictor
from genedml.spots import load_spot_features
from genedml.targets import targets_at

HERE = Path(__file__).resolve().parent
# The accuracy benchmarks' CPU head sizes (paper: dim 512, neighbour 4 x 4, global 5 x 4).
CPU_SIZES = {"dim": 128, "neighbor_depth": 1, "neighbor_mlp_ratio": 1.0, "global_depth": 2, "global_mlp_ratio": 1.0}


def parse_opts(items: list[str]) -> dict:
    """--opt KEY=VALUE items → head settings (JSON values, else strings)."""
    head = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            head[key] = json.loads(value)
        except json.JSONDecodeError:
            head[key] = value
    return head


def fit_and_score(cache: FeatureCache, samples: dict, model: str, head: dict, train: list[str], val: list[str],
                  test: list[str], model_dir: Path) -> dict:
    """`genedml fit` on `train` (selecting on `val`), then PCC-ACG and MSE per test section."""
    settings = FitSettings(model=model, train_samples=train, val_samples=val or None, val_fraction=0.0, head=head)
    start = time.perf_counter()
    result = fit_model(cache, None, model_dir, settings, samples=samples)
    seconds = time.perf_counter() - start
    predictor = Predictor(model_dir)
    scores = {}
    for sample_id in test:
        feats = load_spot_features(cache, [sample_id], with_aug=False)
        truth = targets_at(samples[sample_id], feats.barcodes, predictor.targets)
        pred = predictor.predict(feats, None)["X"]
        scores[sample_id] = {"pcc_acg": mean_gene_pcc(pred, truth), "mse": float(((pred - truth) ** 2).mean()),
                             "mse_of_test_mean": float(((truth.mean(0) - truth) ** 2).mean())}
    history = result.history
    return {"model": model, "head": head, "test": scores,
            "test_pcc_acg_mean": float(sum(v["pcc_acg"] for v in scores.values()) / len(scores)),
            "best_epoch": history.get("best_epoch"), "epochs_run": len(history.get("epochs") or []),
            "best_val_pcc": history.get("best_val_pcc"), "steps_per_epoch": history.get("steps_per_epoch"),
            "fit_seconds": round(seconds, 1), "weights": result.weights}


def her2st_parser(doc: str) -> argparse.ArgumentParser:
    """The options every her2st cache script shares: --cache, --data, --samples-table."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st")
    ap.add_argument("--samples-table", type=Path, default=HERE / "her2st_samples.csv")
    return ap


def main() -> None:
    ap = her2st_parser(__doc__)
    ap.add_argument("--model", default="genedml")
    ap.add_argument("--train", default="C2,C4,C5")
    ap.add_argument("--val", default="C6")
    ap.add_argument("--test", default="C3")
    ap.add_argument("--opt", action="append", default=[], help="head setting KEY=VALUE (JSON values), repeatable")
    ap.add_argument("--out", type=Path, default=HERE / "work" / "small_cohort")
    ap.add_argument("--tag", default="run")
    args = ap.parse_args()
    train, val, test = args.train.split(","), args.val.split(",") if args.val else [], args.test.split(",")
    samples = {s.sample_id: s for s in read_samples(args.data, samples=train + val + test, samples_table=args.samples_table)}
    record = fit_and_score(FeatureCache(args.cache), samples, args.model, parse_opts(args.opt), train, val, test,
                           args.out / args.tag)
    print(json.dumps({"tag": args.tag, **record}))


if __name__ == "__main__":
    main()
