"""What each Gene-DML pathway does inside a fitted model: gradients per loss term and module, k-means groups.

For a genedml model directory (from `genedml fit`, `genedml cv` or `accuracy_her2st.py`) and the cache it was
fitted on, a few training batches are drawn as training draws them (one random dihedral view per spot,
dropout on). On each batch the regression, instance and λ·group terms are computed separately and
differentiated one at a time, so the table says how strongly each term pushes each module (gradient L2 norm
per module). The per-batch k-means of the group loss is reported too: cluster sizes of the image and gene
clusterings (empty clusters, largest share) and how well they agree (adjusted Rand index). The loss curve
(first, best and last epoch) comes from the model's `curve.json`.

    python benchmarks/pathway_diagnostics.py MODEL_DIR --cache benchmarks/work/cache_he-stats \\
        --data ../shared/data/her2st --out benchmarks/results/pathways/he-stats.json

Answers "does a pathway add nothing because no gradient reaches it, or because its groups are degenerate?";
it does not measure accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
# How each weighted loss term is labelled in the output (GeneDMLModel.term_weights: λ, and instance_weight ≠ 1).
WEIGHT_NAMES = {"group": "lambda", "instance": "instance_weight"}
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))


def module_of(name: str) -> str:
    """Top-level module of a parameter name ("fusion.layers.0.attn.qkv.weight" → "fusion")."""
    return name.split(".", 1)[0]


def gradient_norms(loss: torch.Tensor, params: dict[str, torch.nn.Parameter]) -> dict[str, float]:
    """L2 norm of d loss / d params, per top-level module (0.0 where the term does not reach a module)."""
    grads = torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)
    squares: dict[str, float] = defaultdict(float)
    for name, grad in zip(params, grads):
        squares[module_of(name)] += 0.0 if grad is None else float(grad.detach().pow(2).sum())
    return {module: float(np.sqrt(total)) for module, total in squares.items()}


def cluster_summary(labels_image: torch.Tensor, labels_gene: torch.Tensor, k: int) -> dict[str, float]:
    """Sizes of both per-batch clusterings and their agreement."""
    from sklearn.metrics import adjusted_rand_score

    out: dict[str, float] = {}
    for name, labels in (("image", labels_image), ("gene", labels_gene)):
        sizes = np.bincount(labels.cpu().numpy(), minlength=k)
        out[f"{name}_empty_clusters"] = int((sizes == 0).sum())
        out[f"{name}_largest_share"] = float(sizes.max() / sizes.sum())
        out[f"{name}_median_size"] = float(np.median(sizes))
    out["adjusted_rand_image_vs_gene"] = float(adjusted_rand_score(labels_image.cpu().numpy(), labels_gene.cpu().numpy()))
    return out


def diagnose(model_dir: Path, cache_dir: Path, data: Path, samples_table: Path | None, batches: int, seed: int) -> dict:
    from genedml.cache.store import FeatureCache
    from genedml.data import read_samples
    from genedml.heads.batch import BatchMaker
    from genedml.predict import Predictor
    from genedml.spots import load_spot_features
    from genedml.targets import targets_at
    from genedml.heads.training import batch_order

    predictor = Predictor(model_dir)
    head = predictor.head
    cfg = head.settings
    if getattr(cfg, "objective", None) != "genedml":
        raise SystemExit(f"{model_dir} is not a genedml model (objective {getattr(cfg, 'objective', None)!r})")
    ids = list(predictor.config["train_samples"])
    cache = FeatureCache(cache_dir)
    kwargs = {"samples_table": samples_table} if samples_table else {}
    samples = {s.sample_id: s for s in read_samples(data, samples=ids, **kwargs)}
    feats = load_spot_features(cache, ids)
    y = np.concatenate([targets_at(samples[s], feats.barcodes[feats.slide == i], predictor.targets) for i, s in enumerate(ids)])
    model = head._model()
    targets = head.scale_targets(y)
    maker = BatchMaker(feats, head.device, head.needs_neighbor(), head._scaler())
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    rows = []
    for index in batch_order(feats.slide, cfg.batch_size, cfg.batch_slides, generator)[:batches]:
        batch = maker.make(index, generator)
        yb = targets[torch.from_numpy(index)]
        out = model(batch, yb)
        parts, clusters = model.loss_terms(out, yb)  # the training objective's own terms, weighted as it weights them
        weights = model.term_weights()
        terms = {(f"{name} (x {WEIGHT_NAMES[name]})" if name in weights else name): weights.get(name, 1.0) * term
                 for name, term in parts.items()}
        row = {"spots": len(index), "loss": {t: float(v.detach()) for t, v in terms.items()},
               "grad_norm": {t: gradient_norms(v, params) for t, v in terms.items()}}
        if clusters:
            row["kmeans"] = cluster_summary(clusters["labels_image"], clusters["labels_gene"], min(cfg.groups, len(index)))
        rows.append(row)
    curve = json.loads((model_dir / "curve.json").read_text())
    epochs = curve.get("epochs") or []
    best = curve.get("best_epoch")
    pick = {"first": epochs[0] if epochs else None, "best": next((e for e in epochs if e["epoch"] == best), None),
            "last": epochs[-1] if epochs else None}
    return {"model_dir": str(model_dir), "train_samples": ids, "batches": rows, "curve": pick,
            "chance": {"instance": float(np.log(cfg.batch_size)), "group": float(np.log(cfg.groups))},
            "mean_grad_norm": _mean_grads(rows), "mean_kmeans": _mean_kmeans(rows)}


def _mean_grads(rows: list[dict]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for term in rows[0]["grad_norm"]:
        modules = rows[0]["grad_norm"][term]
        out[term] = {m: float(np.mean([r["grad_norm"][term][m] for r in rows])) for m in modules}
    return out


def _mean_kmeans(rows: list[dict]) -> dict[str, float] | None:
    if "kmeans" not in rows[0]:
        return None
    return {key: float(np.mean([r["kmeans"][key] for r in rows])) for key in rows[0]["kmeans"]}


def markdown(record: dict) -> str:
    grads = record["mean_grad_norm"]
    modules = sorted({m for term in grads.values() for m in term})
    lines = ["| loss term | " + " | ".join(modules) + " |", "|---" * (len(modules) + 1) + "|"]
    for term, norms in grads.items():
        lines.append(f"| {term} | " + " | ".join(f"{norms.get(m, 0.0):.3g}" for m in modules) + " |")
    if record["mean_kmeans"]:
        lines.append("")
        lines.append("k-means per batch (mean over batches): " + ", ".join(f"{k} {v:.3g}" for k, v in record["mean_kmeans"].items()))
        # The mean hides a short last batch (three her2st sections: 512 + 33 spots), where 18 groups hold 1-2 spots.
        lines.append("by batch (spots: image / gene median group size): " + ", ".join(
            f"{r['spots']}: {r['kmeans']['image_median_size']:.3g} / {r['kmeans']['gene_median_size']:.3g}" for r in record["batches"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st")
    ap.add_argument("--samples-table", type=Path, default=HERE / "her2st_samples.csv")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the JSON here")
    args = ap.parse_args(argv)
    if args.batches < 1:
        ap.error("--batches must be >= 1")
    table = args.samples_table if args.samples_table and args.samples_table.is_file() else None
    record = diagnose(args.model_dir, args.cache, args.data, table, args.batches, args.seed)
    record.update(date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  command=" ".join(["python", "benchmarks/pathway_diagnostics.py", *(sys.argv[1:] if argv is None else argv)]))
    print(markdown(record))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))
    return record


if __name__ == "__main__":
    main()
