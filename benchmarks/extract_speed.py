r"""Extraction throughput on real slides vs the bare model forward, tile encodings per spot, peak memory.

For each backbone (random-init; the speed does not depend on the weights), in one process:
  (a) a real `run_extraction` (local + lattice-neighbour scales) into a temporary cache, timed wall-clock,
      divided by the throughput of `backbone.encode` on the same tiles already decoded into uint8 tensors,
      in the same batches (sizes and order) as the extraction. The runs are interleaved raw, extract, raw
      so that drift in machine load shows as a gap between the two raw runs. Target: ratio >= 0.9.
  (b) tile encodings per spot, local + neighbour: lattice (from the SampleReport) vs exact (the mask of
      `exact_neighbor_boxes`, counted without encoding). Target: <= 4 vs 26.
  (c) peak RSS of the extraction: VmHWM reset just before it (Linux /proc/self/clear_refs) and read after,
      and the process-lifetime high-water mark from resource.getrusage.
Prints a markdown table and writes JSON with the machine, date and exact command line.

    python benchmarks/extract_speed.py --data /work/shared/data/her2st --samples C3 \
        --backbones timm:resnet18,timm:vit_small_patch16_224 --batch-size 64 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from genedml.backbones import load_backbone
from genedml.data import read_samples
from genedml.data.sample import Sample
from genedml.extract.geometry import exact_neighbor_boxes, lattice_neighbors, local_boxes
from genedml.extract.patches import read_patches
from genedml.extract.runner import ExtractSettings, run_extraction

COLUMNS = ("backbone", "spots", "tiles", "raw tiles/s (first→last)", "extract tiles/s", "extract spots/s",
           "ratio", "ratio w/o decode", "CPU-s ratio", "run-queue wait / wall", "tiles/spot lattice", "tiles/spot exact", "peak RSS MB (extract)")


# ------------------------------------------------------------------------------------------ machine
def _proc_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), in KiB; None off Linux."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS so the next read is the peak of what runs in between."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        match = None
    return match.group(1).strip() if match else (platform.processor() or platform.machine())


def machine_info(threads: int) -> dict:
    return {
        "cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "torch": torch.__version__,
        "torch_threads": threads, "python": platform.python_version(), "platform": platform.platform(),
    }


# ------------------------------------------------------------------------------------------ workload
def quick_subset(sample: Sample, n_spots: int) -> Sample:
    """The `n_spots` spots nearest the section's central spot: a compact patch of tissue, so neighbourhoods
    overlap as they do in a whole section (taking the first rows would give a thin strip)."""
    if sample.n_spots <= n_spots:
        return sample
    centre = sample.centers[np.argmin(np.linalg.norm(sample.centers - np.median(sample.centers, 0), axis=1))]
    keep = np.sort(np.argsort(np.linalg.norm(sample.centers - centre, axis=1), kind="stable")[:n_spots])
    return sample.subset(keep)


def encode_plan(sample: Sample, settings: ExtractSettings) -> tuple[np.ndarray, np.ndarray]:
    """The boxes `extract_sample` encodes (lattice mode): local boxes, then the lattice tiles."""
    fov = settings.geometry.fov_px(sample.mpp)
    lattice = lattice_neighbors(sample.centers, fov, sample.image.width, sample.image.height)
    return local_boxes(sample.centers, fov), lattice.boxes


def tiles_per_spot(sample: Sample, settings: ExtractSettings) -> dict:
    """Local + neighbour tile encodings per spot of the whole sample, both modes, from the geometry alone."""
    fov = settings.geometry.fov_px(sample.mpp)
    w, h = sample.image.width, sample.image.height
    n_lattice = len(lattice_neighbors(sample.centers, fov, w, h).boxes)
    n_exact = int(exact_neighbor_boxes(sample.centers, fov, w, h)[1].sum())
    return {"spots": sample.n_spots, "lattice_tiles": n_lattice, "exact_tiles": n_exact,
            "lattice_per_spot": (sample.n_spots + n_lattice) / sample.n_spots,
            "exact_per_spot": (sample.n_spots + n_exact) / sample.n_spots}


def predecode(samples: list[Sample], settings: ExtractSettings) -> tuple[list[torch.Tensor], float]:
    """uint8 batches of exactly the tiles and batch sizes of the extraction; also the seconds the slide
    decodes took (a one-off cost per sample that the extraction pays and the raw forward does not)."""
    batches, decode_s = [], 0.0
    for sample in samples:
        decode = getattr(sample.image, "decode", None)
        if decode is not None:
            start = time.perf_counter()
            decode()
            decode_s += time.perf_counter() - start
        for boxes in encode_plan(sample, settings):
            for i in range(0, len(boxes), settings.batch_size):
                batches.append(read_patches(sample.image, boxes[i:i + settings.batch_size], settings.patch_px))
        release = getattr(sample.image, "release", None)
        if release is not None:
            release()  # the extraction must decode the slide itself, as a real run does
    return batches, decode_s


def _run_queue_seconds() -> dict[str, float]:
    """Per thread of this process: seconds spent runnable but waiting for a core (/proc schedstat, Linux)."""
    waits = {}
    for stat in Path("/proc/self/task").glob("*/schedstat"):
        try:
            waits[stat.parent.name] = int(stat.read_text().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            continue  # the thread exited meanwhile
    return waits


def _timed(fn) -> tuple[float, float, float]:
    """(wall seconds, process CPU seconds over all threads, run-queue wait seconds) of fn().

    The run-queue wait is how long our threads were ready but other processes held the cores: near zero on
    a quiet machine, comparable to the wall time when the machine is oversubscribed (threads that start and
    end inside fn, e.g. the patch readers, are not counted)."""
    before = _run_queue_seconds()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    after = _run_queue_seconds()
    return wall, cpu, sum(w - before.get(tid, 0.0) for tid, w in after.items())


def raw_forward(backbone, batches: list[torch.Tensor]) -> None:
    for batch in batches:
        backbone.encode(batch)


def extraction(samples: list[Sample], backbone, settings: ExtractSettings, into: dict) -> None:
    """A real run_extraction into a fresh temporary cache; its reports and peak RSS go into `into`."""
    with tempfile.TemporaryDirectory(prefix="genedml-bench-") as cache_dir:
        reset = _reset_peak_rss()
        reports = run_extraction(samples, backbone, cache_dir, settings)
        peak_kib = _proc_kib("VmHWM") if reset else None
    into["reports"] = [asdict(r) for r in reports]
    into["peak_rss_mb"] = max(into.get("peak_rss_mb") or 0, (peak_kib or 0) / 1024) or None


# ------------------------------------------------------------------------------------------ run
def bench_backbone(name: str, samples: list[Sample], full: list[Sample], settings: ExtractSettings,
                   repeats: int) -> dict:
    backbone = load_backbone(name, random_init=True, device="cpu")
    batches, decode_s = predecode(samples, settings)
    n_tiles = sum(len(b) for b in batches)
    n_spots = sum(s.n_spots for s in samples)
    # Warm-up: one forward per distinct batch size (oneDNN builds kernels per input shape on first use).
    for size in sorted({len(b) for b in batches}):
        backbone.encode(next(b for b in batches if len(b) == size))

    rss_before = _proc_kib("VmRSS")
    load = [os.getloadavg()[0]]
    # raw, (extract, raw) x repeats: every extraction sits between two raw runs; ratios are per round.
    raw = [_timed(lambda: raw_forward(backbone, batches))]
    run: dict = {}
    extract = []
    for _ in range(repeats):
        extract.append(_timed(lambda: extraction(samples, backbone, settings, run)))
        raw.append(_timed(lambda: raw_forward(backbone, batches)))
        load.append(os.getloadavg()[0])

    encoded = sum(r["tiles_local"] + r["tiles_neighbor"] for r in run["reports"])
    if encoded != n_tiles:
        raise SystemExit(f"{name}: the extraction encoded {encoded} tiles but the raw plan has {n_tiles}; "
                         "encode_plan no longer matches extract_sample.")
    raw_wall, raw_cpu, raw_wait = (list(column) for column in zip(*raw))
    ext_wall, ext_cpu, ext_wait = (list(column) for column in zip(*extract))
    # (a) extraction tiles/s over raw tiles/s = raw seconds / extraction seconds (same tiles, same batches),
    # the raw seconds being the mean of the runs just before and just after that extraction.
    ratios = [(raw_wall[i] + raw_wall[i + 1]) / 2 / ext_wall[i] for i in range(repeats)]
    extract_s = statistics.median(ext_wall)
    raw_s = statistics.median(raw_wall)
    geometry = [tiles_per_spot(s, settings) for s in full]
    full_spots = sum(g["spots"] for g in geometry)
    return {
        "backbone": name, "dim": backbone.dim, "weights": backbone.weights, "spots": n_spots, "tiles": n_tiles,
        "batches": len(batches), "batch_sizes": [len(b) for b in batches], "repeats": repeats,
        "raw_seconds": raw_wall, "extract_seconds": ext_wall, "slide_decode_seconds": decode_s,
        "raw_tiles_per_s": n_tiles / raw_s, "raw_tiles_per_s_first_last": [n_tiles / raw_wall[0], n_tiles / raw_wall[-1]],
        "extract_tiles_per_s": n_tiles / extract_s, "extract_spots_per_s": n_spots / extract_s,
        "ratio": statistics.median(ratios), "ratio_per_round": ratios,
        # Diagnostic only: what the ratio would be if the one-off slide decode overlapped other work.
        "ratio_without_decode": statistics.median(
            (raw_wall[i] + raw_wall[i + 1]) / 2 / max(1e-9, ext_wall[i] - decode_s) for i in range(repeats)),
        # CPU seconds of all threads: the pipeline's extra work (decode, reading, writing), less load-bound.
        "raw_cpu_seconds": raw_cpu, "extract_cpu_seconds": ext_cpu,
        "cpu_ratio": statistics.median(raw_cpu) / statistics.median(ext_cpu),
        "raw_run_queue_wait_seconds": raw_wait, "extract_run_queue_wait_seconds": ext_wait,
        # (b) from the run's SampleReports, and from the geometry of the whole samples (what --quick skips).
        "run_tiles_per_spot": encoded / n_spots,
        "lattice_tiles_per_spot": sum(g["spots"] * g["lattice_per_spot"] for g in geometry) / full_spots,
        "exact_tiles_per_spot": sum(g["spots"] * g["exact_per_spot"] for g in geometry) / full_spots,
        "per_sample_geometry": geometry,
        # (c) peak RSS while extracting: VmHWM reset just before run_extraction (the process already holds
        # torch, the model and this script's raw batches: see rss_before_extract_mb).
        "extract_peak_rss_mb": run["peak_rss_mb"],
        "rss_before_extract_mb": None if rss_before is None else rss_before / 1024,
        "process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        # Other processes compete for the same cores on a shared machine: note how busy it was.
        "load_average_1min": load,
        "reports": run["reports"],
    }


def markdown_row(r: dict) -> str:
    raw = r["raw_tiles_per_s_first_last"]
    peak = r["extract_peak_rss_mb"]
    cells = (r["backbone"], r["spots"], r["tiles"], f"{r['raw_tiles_per_s']:.1f} ({raw[0]:.1f}→{raw[1]:.1f})",
             f"{r['extract_tiles_per_s']:.1f}",
             f"{r['extract_spots_per_s']:.1f}", f"{r['ratio']:.2f}", f"{r['ratio_without_decode']:.2f}",
             f"{r['cpu_ratio']:.2f}", f"{sum(r['extract_run_queue_wait_seconds']) / sum(r['extract_seconds']):.2f}",
             f"{r['lattice_tiles_per_spot']:.2f}", f"{r['exact_tiles_per_spot']:.2f}",
             "n/a" if peak is None else f"{peak:.0f}")
    return "| " + " | ".join(str(c) for c in cells) + " |"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset folder (any format read_samples reads)")
    parser.add_argument("--samples", default="C3", help="comma-separated sample ids")
    parser.add_argument("--backbones", default="timm:resnet18,timm:vit_small_patch16_224", help="comma-separated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--workers", type=int, default=None, help="patch reader threads of the extraction (default: genedml's)")
    parser.add_argument("--patch-px", type=int, default=224)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: only the batch-size spots nearest each section's centre (a few batches)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="extraction runs, each between two raw runs (raw, extract, raw, extract, raw, ...)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.threads, args.repeats) <= 0 or (args.workers is not None and args.workers < 0):
        parser.error("--batch-size, --threads and --repeats must be positive, --workers >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = ExtractSettings(patch_px=args.patch_px, batch_size=args.batch_size, workers=args.workers,
                               device="cpu", scales=("local", "neighbor"), neighbor_mode="lattice")
    full = read_samples(args.data, samples=[s for s in args.samples.split(",") if s])
    samples = [quick_subset(s, args.batch_size) for s in full] if args.quick else full
    results = [bench_backbone(name, samples, full, settings, args.repeats) for name in args.backbones.split(",") if name]

    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in results:
        print(markdown_row(r))
    if args.json:
        record = {
            "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(torch.get_num_threads()),
            "settings": {"data": str(args.data), "samples": args.samples, "quick": args.quick,
                         "batch_size": args.batch_size, "repeats": args.repeats, "workers": args.workers, "patch_px": args.patch_px,
                         "neighbor_mode": "lattice", "device": "cpu"},
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
