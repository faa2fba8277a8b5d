"""GPU check: extraction throughput vs the raw model forward (ViT-L/16, fp16, batch 256), FAISS GPU vs CPU.

Run by benchmarks/gpu_check.sh on a GPU machine; on CPU with ``--quick`` it is a dry run of every code path
at tiny sizes (tiny-vit, a 2k bank). In one process:
  (a) raw throughput: `backbone.encode` on uint8 batches already on the device (preprocess + forward under
      the spec's autocast), and the bare encoder forward on preprocessed input — before and after (b, c),
      so load drift shows as a gap between the two;
  (b) `run_extraction` (local + lattice neighbours, float16 cache) of synthetic sections, wall-clock;
  (c) the same on her2st sections (JPEG decode included: it is part of the real cost);
  (d) FAISS flat inner-product search of a 10^6 x 256 bank on CPU and (when faiss sees a GPU) on GPU,
      with their top-k agreement, plus torch matmul+topk on the device as a reference that needs no faiss-gpu.
Each part that fails records its error instead of ending the run. Writes gpu_check.json and gpu_check.md.

    python benchmarks/gpu_extract_speed.py --device cuda --her2st .gpu_data/her2st --out gpu_results
    python benchmarks/gpu_extract_speed.py --device cpu --quick --out /tmp/gpu_dry   # dry run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from genedml.backbones import load_backbone
from genedml.extract.runner import ExtractSettings, run_extraction


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_section(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """Run one part; a failure is recorded (with its traceback tail) and the next part still runs."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as exc:  # noqa: BLE001 — a benchmark reports every part it can
        results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    print(f"[{name}] {time.perf_counter() - start:.1f}s: {json.dumps(results[name], default=str)[:600]}", flush=True)


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(), "device": str(device), "command": shlex.join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    return info


# ------------------------------------------------------------------------------------------ model
def raw_throughput(backbone: Any, batch: int, n_batches: int, device: torch.device) -> dict[str, float]:
    """Tiles/s of `encode` on device-resident uint8 batches, and of the bare encoder on preprocessed input."""
    gen = torch.Generator().manual_seed(0)
    size = backbone.spec.input_size
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen).to(device)

    def timed(fn: Callable[[], Any]) -> float:
        for _ in range(2):  # warm-up: cuDNN/cuBLAS heuristics, allocator
            fn()
        _sync(device)
        start = time.perf_counter()
        for _ in range(n_batches):
            fn()
        _sync(device)
        return batch * n_batches / (time.perf_counter() - start)

    pre = backbone.preprocess(x)

    @torch.inference_mode()
    def forward() -> Any:
        with backbone._autocast():  # the spec's precision, exactly as encode() runs it
            return backbone.encoder.tokens(pre, 0)

    return {"encode_tiles_per_s": round(timed(lambda: backbone.encode(x)), 1),
            "forward_tiles_per_s": round(timed(forward), 1)}


def extraction_throughput(samples: list[Any], backbone: Any, settings: ExtractSettings) -> dict[str, Any]:
    """Wall-clock tiles/s and spots/s of a real run_extraction into a temporary cache."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_cache_") as tmp:
        start = time.perf_counter()
        reports = run_extraction(samples, backbone, Path(tmp) / "cache", settings)
        wall = time.perf_counter() - start
    tiles = sum(r.tiles_local + r.tiles_neighbor for r in reports)
    spots = sum(r.spots for r in reports)
    return {"samples": len(reports), "spots": spots, "tiles": tiles, "seconds": round(wall, 2),
            "tiles_per_s": round(tiles / wall, 1), "spots_per_s": round(spots / wall, 1),
            "tiles_per_spot": round(tiles / max(1, spots), 3)}


# ------------------------------------------------------------------------------------------ faiss
def faiss_status() -> dict[str, Any]:
    try:
        import faiss
    except ImportError as exc:
        return {"importable": False, "error": str(exc)}
    gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
    return {"importable": True, "version": getattr(faiss, "__version__", "?"), "gpu_build": hasattr(faiss, "StandardGpuResources"), "num_gpus": gpus}


def retrieval_benchmark(bank_size: int, dim: int, n_queries: int, k: int, device: torch.device) -> dict[str, Any]:
    """Flat cosine search: FAISS CPU, FAISS GPU (if any), torch matmul+topk on `device`; q/s and top-k agreement."""
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((bank_size, dim), dtype=np.float32)
    queries = bank[rng.choice(bank_size, n_queries, replace=False)] + 0.5 * rng.standard_normal((n_queries, dim), dtype=np.float32)
    out: dict[str, Any] = {"bank": bank_size, "dim": dim, "queries": n_queries, "k": k, "faiss": faiss_status()}

    def timed_search(index: Any) -> tuple[float, np.ndarray]:
        from genedml.retrieval import search

        search(index, queries[: min(64, n_queries)], k)  # warm-up
        start = time.perf_counter()
        _, idx = search(index, queries, k)
        return n_queries / (time.perf_counter() - start), idx

    reference = None
    if out["faiss"]["importable"]:
        from genedml.retrieval import build_index

        start = time.perf_counter()
        cpu = build_index(bank, "flat", use_gpu=False)
        out["faiss_cpu_build_s"] = round(time.perf_counter() - start, 2)
        qps, reference = timed_search(cpu)
        out["faiss_cpu_qps"] = round(qps, 1)
        del cpu
        if out["faiss"]["num_gpus"] > 0:
            start = time.perf_counter()
            gpu = build_index(bank, "flat", use_gpu=True)
            out["faiss_gpu_build_s"] = round(time.perf_counter() - start, 2)
            qps, idx = timed_search(gpu)
            out["faiss_gpu_qps"] = round(qps, 1)
            out["faiss_gpu_over_cpu"] = round(out["faiss_gpu_qps"] / out["faiss_cpu_qps"], 2)
            out["faiss_gpu_topk_agreement"] = _agreement(idx, reference)
            del gpu
        else:
            out["faiss_gpu_qps"] = None
            out["faiss_gpu_note"] = "faiss sees no GPU (faiss-cpu build, or no device): carry a faiss-gpu wheel"

    # torch on the device: exact search that needs no faiss-gpu (what BLEEP does), chunked to bound memory.
    from genedml.retrieval import l2_normalise

    keys = torch.from_numpy(l2_normalise(bank)).to(device)
    q = torch.from_numpy(l2_normalise(queries)).to(device)
    chunk = max(1, min(n_queries, (1 << 30) // (4 * bank_size)))  # ~1 GiB similarity block

    def torch_topk() -> torch.Tensor:
        parts = [torch.topk(q[i : i + chunk] @ keys.T, k, dim=1).indices for i in range(0, n_queries, chunk)]
        return torch.cat(parts)

    torch_topk()
    _sync(device)
    start = time.perf_counter()
    idx_t = torch_topk()
    _sync(device)
    out[f"torch_{device.type}_qps"] = round(n_queries / (time.perf_counter() - start), 1)
    if reference is not None:
        out[f"torch_{device.type}_topk_agreement"] = _agreement(idx_t.cpu().numpy(), reference)
    return out


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of shared neighbour ids per query (order and float ties ignored)."""
    return round(float(np.mean([len(np.intersect1d(x, y)) / len(y) for x, y in zip(a, b)])), 4)


# ------------------------------------------------------------------------------------------ report
def pytest_summary(log: Path | None, rc: int | None) -> dict[str, Any] | None:
    if log is None:
        return None
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if rc == 5:
        verdict = "no tests marked gpu were collected"
    elif rc == 0:
        last = lines[-1] if lines else ""
        verdict = "passed" if " passed" in last else "nothing ran (all selected tests skipped)"
    elif rc in (124, 137):
        verdict = "timed out"
    else:
        verdict = f"failed (pytest exit {rc})"
    return {"rc": rc, "verdict": verdict, "last_line": lines[-1] if lines else ""}


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"# GPU check — {m.get('gpu', m['device'])}", "",
             f"{m['date']}; torch {m['torch']} (CUDA {m['cuda']}), python {m['python']}, {m['cpu_count']} CPUs.",
             f"Command: `{m['command']}`", ""]
    if results.get("pytest"):
        p = results["pytest"]
        lines += [f"**pytest -m gpu**: {p['verdict']} — `{p['last_line']}`", ""]
    b = results.get("backbone", {})
    lines += [f"## Extraction vs raw model — {b.get('name')} ({b.get('arch')}, {b.get('weights')}), "
              f"precision {b.get('precision')}, batch {results['settings']['batch_size']}, "
              f"{results['settings']['workers']} reader threads", "",
              "| run | tiles | spots | seconds | tiles/s | spots/s | tiles/spot | vs raw encode |", "|---|---|---|---|---|---|---|---|"]
    raw = [results.get(k, {}) for k in ("raw_before", "raw_after")]
    enc = [r["encode_tiles_per_s"] for r in raw if "encode_tiles_per_s" in r]
    ref = max(enc) if enc else None  # the faster raw run: a conservative ratio
    for key in ("extract_synthetic", "extract_her2st"):
        r = results.get(key)
        if not r:
            continue
        if "error" in r:
            lines.append(f"| {key} | error: {r['error'][:200]} | | | | | | |")
            continue
        ratio = f"{r['tiles_per_s'] / ref:.2f}" if ref else "—"
        lines.append(f"| {key} | {r['tiles']} | {r['spots']} | {r['seconds']} | {r['tiles_per_s']} | {r['spots_per_s']} | {r['tiles_per_spot']} | {ratio} |")
    for key, r in zip(("raw_before", "raw_after"), raw):
        if "error" in r:
            lines.append(f"| {key} | error: {r['error'][:200]} | | | | | | |")
        elif r:
            lines.append(f"| {key}: encode (uint8 → tokens) | | | | {r['encode_tiles_per_s']} | | | 1 |")
            lines.append(f"| {key}: bare forward | | | | {r['forward_tiles_per_s']} | | | |")
    f = results.get("retrieval", {})
    lines += ["", f"## Retrieval — flat cosine, bank {f.get('bank')} × {f.get('dim')}, {f.get('queries')} queries, k={f.get('k')}", ""]
    if "error" in f:
        lines.append(f"error: {f['error']}")
    else:
        lines.append(f"faiss: {json.dumps(f.get('faiss'))}")
        lines += ["", "| method | queries/s | top-k agreement with faiss CPU |", "|---|---|---|"]
        for key, label in (("faiss_cpu_qps", "faiss CPU"), ("faiss_gpu_qps", "faiss GPU")):
            if key in f:
                agree = f.get("faiss_gpu_topk_agreement", "") if "gpu" in key else 1
                lines.append(f"| {label} | {f[key] if f[key] is not None else f.get('faiss_gpu_note', 'n/a')} | {agree} |")
        for key in f:
            if key.startswith("torch_") and key.endswith("_qps"):
                lines.append(f"| torch matmul+topk ({key.split('_')[1]}) | {f[key]} | {f.get(key.replace('_qps', '_topk_agreement'), '')} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (dry run on CPU)")
    ap.add_argument("--backbone", default=None, help="default: uni (ViT-L/16, fp16) random-init; tiny-vit with --quick")
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 (8 with --quick)")
    ap.add_argument("--raw-batches", type=int, default=None, help="timed batches per raw run (default 10; 2 with --quick)")
    ap.add_argument("--workers", type=int, default=None, help="patch-reading threads (default min(8, CPUs))")
    ap.add_argument("--synthetic-grid", type=int, nargs=2, default=None, help="spot grid of each synthetic section")
    ap.add_argument("--synthetic-samples", type=int, default=None)
    ap.add_argument("--her2st", type=Path, default=None, help="her2st folder (skipped when absent)")
    ap.add_argument("--her2st-samples", default=None, help="comma-separated ids (default: all; C3 with --quick)")
    ap.add_argument("--bank", type=int, default=None, help="retrieval bank size (default 10^6; 2000 with --quick)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=None, help="default 10000 (100 with --quick)")
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--pytest-log", type=Path, default=None)
    ap.add_argument("--pytest-rc", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_results")))
    a = ap.parse_args(argv)
    quick = a.quick
    pick = lambda value, full, small: value if value is not None else (small if quick else full)  # noqa: E731
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device (use --device cpu --quick for a dry run)", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(device), "pytest": pytest_summary(a.pytest_log, a.pytest_rc)}
    settings = ExtractSettings(batch_size=pick(a.batch_size, 256, 8), workers=pick(a.workers, min(8, os.cpu_count() or 1), 1),
                               device=str(device), dtype="float16", scales=("local", "neighbor"), neighbor_mode="lattice")
    results["settings"] = {"batch_size": settings.batch_size, "workers": settings.workers, "scales": list(settings.scales),
                           "neighbor_mode": settings.neighbor_mode, "dtype": settings.dtype}

    name = pick(a.backbone, "uni", "tiny-vit")
    start = time.perf_counter()
    backbone = load_backbone(name, random_init=True, device=device)
    results["backbone"] = {"name": name, "arch": backbone.spec.arch, "dim": backbone.dim, "precision": backbone.spec.precision,
                           "weights": backbone.weights, "load_s": round(time.perf_counter() - start, 1),
                           "params_M": round(sum(p.numel() for p in backbone.parameters()) / 1e6, 1)}
    print(f"[backbone] {results['backbone']}", flush=True)
    n_raw = pick(a.raw_batches, 10, 2)
    run_section(results, "raw_before", lambda: raw_throughput(backbone, settings.batch_size, n_raw, device))

    def synthetic() -> dict[str, Any]:
        from genedml.data.synthetic import make_synthetic_sample

        grid = tuple(pick(a.synthetic_grid, (32, 32), (6, 6)))
        samples = [make_synthetic_sample(f"SYN{i}", grid=grid, seed=i, n_genes=8) for i in range(pick(a.synthetic_samples, 2, 1))]
        run_extraction(samples[:1], backbone, Path(tempfile.mkdtemp(prefix="gpu_check_warm_")), settings)  # warm-up
        return extraction_throughput(samples, backbone, settings)

    run_section(results, "extract_synthetic", synthetic)

    if a.her2st is not None and a.her2st.is_dir():
        def her2st() -> dict[str, Any]:
            from genedml.data import read_samples

            ids = a.her2st_samples or ("C3" if quick else None)
            samples = read_samples(a.her2st, samples=ids.split(",") if ids else None)
            return extraction_throughput(samples, backbone, settings)

        run_section(results, "extract_her2st", her2st)
    else:
        results["extract_her2st"] = {"error": f"her2st folder not found: {a.her2st} (copy ../shared/data/her2st into .gpu_data/her2st and carry it)"}

    run_section(results, "raw_after", lambda: raw_throughput(backbone, settings.batch_size, n_raw, device))
    backbone = None  # free the model before the FAISS section
    if device.type == "cuda":
        torch.cuda.empty_cache()
    run_section(results, "retrieval", lambda: retrieval_benchmark(pick(a.bank, 1_000_000, 2000), a.dim, pick(a.queries, 10_000, 100), a.k, device))

    (a.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    md = markdown(results)
    (a.out / "gpu_check.md").write_text(md)
    print(md)
    failed = [k for k, v in results.items() if isinstance(v, dict) and "error" in v and k != "extract_her2st"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
