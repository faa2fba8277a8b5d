r"""Approximate retrieval at scale: recall and prediction error of the ivf and ivfpq indexes vs exact flat.

On synthetic clustered unit vectors (points near `--clusters` random unit centres, spread along a
`--rank`-d subspace per cluster plus a little isotropic noise: embeddings of tissue lie near a
low-dimensional manifold) with expression a smooth function of the embedding, for each bank size:
  - the exact neighbours of `--queries` fresh queries (new points from the same clusters) from a flat index;
  - for ivf and ivfpq, built by genedml's `build_index` with its default settings: build seconds, index
    bytes on disk (`save_index`), and at nprobe = nlist/32, nlist/8 (the default) and nlist/2: query
    ms/query, recall@k (share of the exact top-k found) and the relative error of the retrieval-weighted
    prediction (`aggregate`, uniform over k = 50 as BLEEP and softmax tau = 0.07) against flat's;
  - for ivfpq, both its own (PQ-approximate) ranking, as `search` returns it, and what `retrieve_predict`
    uses (`search_bank`): its top 4k re-ranked exactly with the bank's float32 embeddings.
Prints a markdown table per size and writes one JSON per size (machine, date, exact command).

    nice -n 10 python benchmarks/retrieval_recall.py --sizes 100000,1000000 --dim 256 --queries 1000 \
        --out benchmarks/results/retrieval_recall
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from genedml.retrieval import (
    RERANK_FACTOR,
    aggregate,
    build_index,
    index_params,
    l2_normalise,
    save_index,
    search,
    search_bank,
    set_nprobe,
)

KS = (10, 50)
PREDICT_K = 50
TAU = 0.07


# ------------------------------------------------------------------------------------------- data
def clustered_unit_vectors(n: int, dim: int, clusters: int, rank: int, seed: int, spread: float = 0.5) -> np.ndarray:
    """(n, dim) float32 unit rows: unit centre + (rank-d spread of RMS norm `spread` in the cluster's own
    subspace) + isotropic noise of norm 0.05; centres are sqrt(2) apart on average.

    The clusters (centres, subspaces) depend on `dim`, `clusters` and `rank` only, so a bank and its
    queries drawn with different seeds share them. Built one cluster at a time (no (n, rank, dim) temporary).
    """
    shape_rng = np.random.default_rng([dim, clusters, rank])
    centres = l2_normalise(shape_rng.standard_normal((clusters, dim)))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(clusters, 1.0 / clusters))
    out = np.empty((n, dim), dtype=np.float32)
    start = 0
    for c, count in enumerate(counts):
        basis = shape_rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(dim)
        offset = (spread / np.sqrt(rank)) * rng.standard_normal((count, rank)).astype(np.float32) @ basis
        noise = (0.05 / np.sqrt(dim)) * rng.standard_normal((count, dim)).astype(np.float32)
        out[start:start + count] = centres[c] + offset + noise
        start += count
    rng.shuffle(out)  # the bank's row order says nothing about clusters
    return l2_normalise(out)


def expression_of(x: np.ndarray, genes: int, chunk: int = 200_000) -> np.ndarray:
    """(n, genes) float32 log-expression, a smooth function of the embedding: log1p(softplus(3 x W))."""
    w = np.random.default_rng(12345).standard_normal((x.shape[1], genes)).astype(np.float32)
    w *= 3.0 / np.linalg.norm(w, axis=0, keepdims=True)
    out = np.empty((len(x), genes), dtype=np.float32)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = np.log1p(np.logaddexp(0.0, x[s:s + chunk] @ w))
    return out


# ---------------------------------------------------------------------------------------- measures
def recall(found: np.ndarray, exact: np.ndarray, k: int) -> float:
    """Mean share of each query's exact top-k that `found`'s top-k holds."""
    hits = [np.intersect1d(f[:k], e[:k]).size for f, e in zip(found, exact)]
    return float(np.mean(hits)) / k


def relative_error(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """|pred - ref| over |ref| (Frobenius), and over |ref - its gene means| (the part that varies)."""
    diff = np.linalg.norm(pred - ref)
    return {"of_values": float(diff / np.linalg.norm(ref)),
            "of_variation": float(diff / np.linalg.norm(ref - ref.mean(axis=0)))}


def predictions(expr: np.ndarray, sim: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    sim, idx = sim[:, :PREDICT_K], idx[:, :PREDICT_K]
    return {"uniform": aggregate(expr, idx, sim, "uniform"), "softmax": aggregate(expr, idx, sim, "softmax", TAU)}


def timed_search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    start = time.perf_counter()
    sim, idx = search(index, queries, k)
    return sim, idx, (time.perf_counter() - start) * 1000 / len(queries)


def index_bytes(index: faiss.Index, workdir: Path) -> int:
    path = save_index(index, workdir / "index.faiss")
    size = path.stat().st_size
    path.unlink()
    return size


def measure_kind(kind: str, bank: np.ndarray, queries: np.ndarray, exact: dict, expr: np.ndarray,
                 truth: np.ndarray, workdir: Path, pq_m: int | None) -> list[dict]:
    """Rows (one per nprobe, plus the re-rank diagnostic for ivfpq) for one approximate index kind."""
    start = time.perf_counter()
    index = build_index(bank, kind, use_gpu=False, pq_m=pq_m)
    build_s = time.perf_counter() - start
    params = index_params(index)
    size = index_bytes(index, workdir)
    nlist, default_nprobe = params["nlist"], params["nprobe"]
    rows = []
    for nprobe in sorted({max(1, nlist // 32), default_nprobe, max(1, nlist // 2)}):
        set_nprobe(index, nprobe)
        sim, idx, ms = timed_search(index, queries, max(KS))
        variants = [(kind, sim, idx, ms)]
        if kind == "ivfpq":  # what retrieve_predict does: shortlist RERANK_FACTOR * k, re-rank exactly
            start = time.perf_counter()
            rsim, ridx = search_bank(index, bank, queries, max(KS))
            variants.append((f"ivfpq + re-rank {RERANK_FACTOR}k", rsim, ridx,
                             (time.perf_counter() - start) * 1000 / len(queries)))
        for name, sim_v, idx_v, ms_v in variants:
            preds = predictions(expr, sim_v, idx_v)
            rows.append({
                "index": name, "nprobe": nprobe, "default_nprobe": nprobe == default_nprobe,
                "params": params | {"nprobe": nprobe}, "build_s": build_s, "index_bytes": size,
                "query_ms": ms_v, **{f"recall@{k}": recall(idx_v, exact["idx"], k) for k in KS},
                "prediction_rel_error_vs_flat": {w: relative_error(p, exact["pred"][w]) for w, p in preds.items()},
                "prediction_rel_error_vs_truth": {w: relative_error(p, truth) for w, p in preds.items()},
                "missing_neighbours": int((idx_v[:, :PREDICT_K] < 0).sum()),
            })
    del index
    return rows


def run_size(n: int, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    bank = clustered_unit_vectors(n, args.dim, args.clusters, args.rank, args.seed, args.spread)
    queries = clustered_unit_vectors(args.queries, args.dim, args.clusters, args.rank, args.seed + 1, args.spread)
    expr = expression_of(bank, args.genes)
    truth = expression_of(queries, args.genes)
    data_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        start = time.perf_counter()
        flat = build_index(bank, "flat", use_gpu=False)
        flat_build = time.perf_counter() - start
        sim, idx, ms = timed_search(flat, queries, max(KS))
        flat_bytes = index_bytes(flat, workdir)
        del flat
        exact = {"idx": idx, "pred": predictions(expr, sim, idx)}
        rows = [{"index": "flat", "params": {"kind": "flat"}, "build_s": flat_build, "index_bytes": flat_bytes,
                 "query_ms": ms, **{f"recall@{k}": 1.0 for k in KS}}]
        for kind in args.kinds.split(","):
            rows += measure_kind(kind, bank, queries, exact, expr, truth, workdir, args.pq_m)
    # How good the exact retrieval itself is: its prediction against the queries' true expression.
    rows[0]["prediction_rel_error_vs_truth"] = {w: relative_error(p, truth) for w, p in exact["pred"].items()}
    return {"references": n, "dim": args.dim, "queries": args.queries, "clusters": args.clusters,
            "rank": args.rank, "spread": args.spread, "genes": args.genes, "predict_k": PREDICT_K, "softmax_tau": TAU,
            "data_seconds": data_s, "rows": rows}


# ------------------------------------------------------------------------------------------ report
def machine() -> dict:
    cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    mem = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return {"cpu_model": cpu.group(1).strip() if cpu else platform.machine(), "cpu_count": os.cpu_count(),
            "mem_gb": round(int(mem.group(1)) / 2**20, 1) if mem else None,
            "faiss_threads": faiss.omp_get_max_threads(), "faiss": faiss.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def markdown(result: dict) -> str:
    """One row per index and nprobe. Prediction errors are relative to the variation of the reference
    prediction across queries (|pred - ref| / |ref - gene means|), uniform k = 50 / softmax tau = 0.07."""
    head = ("| index | nprobe / nlist | m × nbits | build s | index MB | ms/query | recall@10 | recall@50 | "
            "pred. error vs flat (uniform / softmax) | pred. error vs truth (uniform / softmax) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        p = r["params"]
        probe = "—" if "nlist" not in p else f"{r['nprobe']} / {p['nlist']}" + (" (default)" if r["default_nprobe"] else "")
        pq = f"{p['pq_m']} × {p['nbits']}" if "pq_m" in p else "—"
        pair = lambda e: f"{e['uniform']['of_variation']:.3f} / {e['softmax']['of_variation']:.3f}"
        vs_flat = pair(r["prediction_rel_error_vs_flat"]) if "prediction_rel_error_vs_flat" in r else "0 (exact)"
        lines.append(f"| {r['index']} | {probe} | {pq} | {r['build_s']:.1f} | {r['index_bytes'] / 1e6:.1f} | "
                     f"{r['query_ms']:.2f} | {r['recall@10']:.3f} | {r['recall@50']:.3f} | {vs_flat} | "
                     f"{pair(r['prediction_rel_error_vs_truth'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="bank sizes, comma-separated")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=20)
    parser.add_argument("--rank", type=int, default=64, help="dimension of each cluster's spread")
    parser.add_argument("--spread", type=float, default=1.0, help="RMS norm of a point's offset from its centre")
    parser.add_argument("--genes", type=int, default=50)
    parser.add_argument("--pq-m", type=int, default=None, help="ivfpq sub-quantisers (default: build_index's)")
    parser.add_argument("--kinds", default="ivf,ivfpq")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: leave as set)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/retrieval_recall"))
    args = parser.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + shlex.join(["benchmarks/retrieval_recall.py", *(sys.argv[1:] if argv is None else argv)])
    for n in (int(s) for s in args.sizes.split(",")):
        start = time.perf_counter()
        result = run_size(n, args)
        result.update(seconds=time.perf_counter() - start, command=command, machine=machine(),
                      date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                      load_average=os.getloadavg(),
                      peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        name = (f"n{n}_d{args.dim}_c{args.clusters}_r{args.rank}_s{args.spread:g}_{args.kinds.replace(',', '+')}"
                + (f"_m{args.pq_m}" if args.pq_m else "") + ".json")
        (args.out / name).write_text(json.dumps(result, indent=2))
        print(f"\n### {n:,} references × {args.dim}-d, {args.queries} queries (rank {args.rank}); "
              f"{result['seconds']:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB -> {args.out / name}\n")
        print(markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
