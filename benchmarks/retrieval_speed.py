r"""Retrieval throughput: bare FAISS search vs genedml's retrieve_predict vs BLEEP-style brute force.

Measures, on one synthetic bank and query set, in the same process:
  (a) bare FAISS search of a flat inner-product index (queries/s),
  (b) genedml.retrieval.retrieve_predict: search + weighted aggregation (target (b)/(a) >= 0.9),
  (c) BLEEP's way: torch matmul of all queries against the whole bank, topk, mean of the k rows.
Each is timed `--repeats` times after one warm-up run, the three alternating within each round; the median
seconds and the median of per-round ratios are reported. Prints a markdown row and writes JSON.

    python benchmarks/retrieval_speed.py --bank 100000 --queries 2000 --dim 256 --genes 250 --k 50 \
        --repeats 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch

from genedml.retrieval import (
    WEIGHTINGS,
    ReferenceBank,
    aggregate,
    brute_force_topk,
    build_index,
    retrieve_predict,
)

COLUMNS = ("bank", "queries", "dim", "genes", "k", "weighting", "threads", "(a) faiss q/s",
           "(b) retrieve_predict q/s", "(c) brute force q/s", "(b)/(a)", "(b)/(a) from parts", "(c)/(a)",
           "peak RSS MB")


def _interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each fn per round; the fns alternate within a round so that load from other
    processes on a shared machine hits all of them alike (ratios are taken within a round)."""
    for fn in fns.values():
        fn()  # warm-up: first-touch allocations, BLAS/OpenMP thread start
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def _synthetic(bank: int, queries: int, dim: int, genes: int, seed: int):
    """Bank embeddings with some cluster structure, expression tied to it, queries near bank spots."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32)
    embeddings = centres[rng.integers(0, 64, bank)] + rng.standard_normal((bank, dim)).astype(np.float32)
    expression = np.log1p(rng.gamma(1.0, 2.0, (bank, genes))).astype(np.float32)
    picks = rng.integers(0, bank, queries)
    query = embeddings[picks] + 0.5 * rng.standard_normal((queries, dim)).astype(np.float32)
    sample_ids = np.repeat([f"S{i}" for i in range(8)], -(-bank // 8))[:bank]
    return ReferenceBank(embeddings, expression, sample_ids, np.arange(bank).astype(str)), query


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    bank, queries = _synthetic(args.bank, args.queries, args.dim, args.genes, args.seed)
    index = build_index(bank.embeddings, "flat", use_gpu=False)
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)

    def bare_search():
        return index.search(unit_queries, args.k)

    def full():
        return retrieve_predict(bank, index, queries, k=args.k, weighting=args.weighting, tau=args.tau)

    def aggregation_only():  # (b) minus the search: the overhead retrieve_predict adds, load-robust
        return aggregate(bank.expression, result.neighbor_idx, result.similarity, args.weighting, args.tau,
                         query=queries, bank_embeddings=bank.embeddings)

    expression = torch.from_numpy(bank.expression)

    def bleep():
        _, idx = brute_force_topk(bank, queries, args.k)  # full (Q, M) similarity matrix, then topk
        return expression[torch.from_numpy(idx)].mean(dim=1)

    # Same answers before timing anything: the comparison is only fair if all three do the same work.
    sim_a, idx_a = bare_search()
    result = full()
    if not np.array_equal(result.neighbor_idx, idx_a):
        raise SystemExit("retrieve_predict returned other neighbours than the bare FAISS search")
    _, idx_c = brute_force_topk(bank, queries, args.k)
    agreement = float(np.mean([np.intersect1d(a, c).size for a, c in zip(idx_a, idx_c)])) / idx_a.shape[1]

    load_before = os.getloadavg()[0]
    times = _interleaved_seconds({"faiss": bare_search, "retrieve_predict": full, "brute_force": bleep,
                                  "aggregate_only": aggregation_only}, args.repeats)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    qps = {name: args.queries / s for name, s in seconds.items()}
    # Throughput ratio X/(a) within each round = t_faiss / t_X; the median over rounds.
    ratio = {name: statistics.median(f / t for f, t in zip(times["faiss"], times[name]))
             for name in ("retrieve_predict", "brute_force")}
    return {
        "bank": args.bank, "queries": args.queries, "dim": args.dim, "genes": args.genes, "k": args.k,
        "weighting": args.weighting, "repeats": args.repeats,
        "faiss_threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads(),
        "seconds_median": seconds, "seconds_all": times, "queries_per_s": qps,
        "ratio_retrieve_predict_over_faiss": ratio["retrieve_predict"],
        "ratio_brute_force_over_faiss": ratio["brute_force"],
        # The same ratio from the parts, t_a / (t_a + t_aggregate): less sensitive to other processes.
        "ratio_retrieve_predict_over_faiss_from_parts":
            seconds["faiss"] / (seconds["faiss"] + seconds["aggregate_only"]),
        # Other processes compete for the same cores on a shared machine: note how busy it was.
        "load_average_1min": [load_before, os.getloadavg()[0]], "cpu_count": os.cpu_count(),
        "topk_set_agreement_brute_vs_faiss": agreement,
        # ru_maxrss is KiB on Linux: the peak over the whole run, dominated by (c)'s (Q, M) matrix.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "faiss_version": faiss.__version__, "torch_version": torch.__version__,
        "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
    }


def markdown_row(r: dict) -> str:
    q = r["queries_per_s"]
    cells = (r["bank"], r["queries"], r["dim"], r["genes"], r["k"], r["weighting"], r["faiss_threads"],
             f"{q['faiss']:.0f}", f"{q['retrieve_predict']:.0f}", f"{q['brute_force']:.0f}",
             f"{r['ratio_retrieve_predict_over_faiss']:.2f}",
             f"{r['ratio_retrieve_predict_over_faiss_from_parts']:.3f}", f"{r['ratio_brute_force_over_faiss']:.2f}",
             f"{r['peak_rss_mb']:.0f}")
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=100_000, help="reference spots M")
    parser.add_argument("--queries", type=int, default=2000, help="query spots Q")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension E")
    parser.add_argument("--genes", type=int, default=250, help="genes G in the expression bank")
    parser.add_argument("--k", type=int, default=50, help="neighbours per query")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="softmax")
    parser.add_argument("--tau", type=float, default=0.07)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0 = library defaults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = run(args)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    print(markdown_row(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
