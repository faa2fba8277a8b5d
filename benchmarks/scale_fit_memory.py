"""Where `genedml fit`'s memory and time go on a synthetic cohort (a diagnostic beside scale.py).

    python benchmarks/scale_fit_memory.py --spots N --dim D --steps K --out DIR

Builds the same cohort as scale.py, then runs the real `fit_model` in this process with the settings of
scale.py (batch 512, CPU head sizes, `--batch-slides`), sampling VmRSS every 10 ms and attributing the peak
to the stage running (reading counts, reading the cached slides, concatenating them, each training step,
the reference bank). `--steps K` cuts the epoch to its first K batches (by wrapping `batch_order`) so a
large N can be probed in minutes; the peak of a full epoch is higher (allocator retention grows over
steps: at 25k, 5 steps reached 4.29 GB, the full 49-step epoch 4.85 GB). Writes DIR/fit_memory.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale  # noqa: E402  (benchmarks/scale.py: the cohort and the fit settings)


class RssMonitor:
    """VmRSS sampled in a thread; the peak is kept per stage label."""

    def __init__(self) -> None:
        self.stage, self.peaks = "start", {}
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def rss() -> int:
        line = next(line for line in open("/proc/self/status") if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def _run(self) -> None:
        while True:
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), self.rss())
            time.sleep(0.01)

    def wrap(self, owner: object, name: str, label: str, log: list) -> None:
        """Run owner.name under stage `label` and log its seconds, peak and resident bytes after it."""
        inner = getattr(owner, name)

        @functools.wraps(inner)
        def staged(*args, **kwargs):
            before, self.stage = self.stage, label
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                log.append({"stage": label, "seconds": round(time.perf_counter() - start, 2),
                            "peak_bytes": self.peaks.get(label, 0), "rss_after_bytes": self.rss()})
                print(log[-1], flush=True)
                self.stage = before

        setattr(owner, name, staged)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spots", type=int, required=True)
    ap.add_argument("--dim", type=int, required=True)
    ap.add_argument("--steps", type=int, default=5, help="training steps to run (the epoch is cut after them)")
    ap.add_argument("--batch-slides", type=int, default=1)
    ap.add_argument("--spots-per-slide", type=int, default=4000)
    ap.add_argument("--encoder-dim", type=int, default=0, help="head setting encoder_dim (0 = the backbone width)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    monitor, log = RssMonitor(), []

    import genedml.data
    import genedml.fit as fit
    from genedml.heads import training
    from genedml.heads.gene_dml import SCALES  # the authors' three scales, as scale.py fits

    work = args.out / "work"
    shutil.rmtree(work, ignore_errors=True)
    monitor.stage = "build cohort"
    built = scale.build_cohort(work, args.spots, args.dim, args.spots_per_slide, 300, 0.25, 0)
    monitor.stage = "start"
    baseline = monitor.rss()
    monitor.wrap(genedml.data, "read_samples", "read counts (h5ad)", log)
    monitor.wrap(fit, "load_spot_features", "read cached slides into the assembled arrays", log)  # fit imports it by name
    monitor.wrap(fit, "write_bank", "reference bank", log)
    first_batches = training.batch_order

    def cut(*a, **k):
        return first_batches(*a, **k)[: args.steps]

    training.batch_order = cut
    step_log: list = []
    loss = training.NeuralHead._train_epoch

    make = training.BatchMaker.make

    def make_step(maker, index, generator=None):
        if step_log:
            step_log[-1].update(seconds=round(time.perf_counter() - step_log[-1].pop("t"), 2), peak_bytes=monitor.peaks.get(monitor.stage, 0))
        monitor.stage = f"step {len(step_log) + 1}"
        step_log.append({"step": len(step_log) + 1, "rss_before_bytes": monitor.rss(), "t": time.perf_counter()})
        return make(maker, index, generator)

    def timed_epoch(self, *a, **k):
        # Every batch of the epoch, in memory or streamed, goes through BatchMaker.make: time and stage each one.
        training.BatchMaker.make = make_step
        try:
            out = loss(self, *a, **k)
        finally:
            training.BatchMaker.make = make
        step_log[-1].update(seconds=round(time.perf_counter() - step_log[-1].pop("t"), 2), peak_bytes=monitor.peaks.get(monitor.stage, 0))
        monitor.stage = "after training"
        return out

    training.NeuralHead._train_epoch = timed_epoch
    settings = fit.FitSettings(model="genedml", val_fraction=0.0, seed=0,
                               head={**scale.FIT_HEAD, "scales": SCALES, "epochs": 1, "batch_size": 512, "batch_slides": args.batch_slides,
                                     "encoder_dim": args.encoder_dim})
    start = time.perf_counter()
    fit.fit_model(built["cache"], built["data"], work / "model", settings)
    cache_bytes = scale.tree_bytes(built["cache"])
    record = {
        "spots": args.spots, "dim": args.dim, "steps": args.steps, "batch_slides": args.batch_slides,
        "spots_per_slide": args.spots_per_slide, "encoder_dim": args.encoder_dim,
        "command": " ".join(["python", "benchmarks/scale_fit_memory.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "genedml_commit": scale.git_commit(), "machine": scale.machine(),
        "cache_bytes": cache_bytes, "rss_before_fit_bytes": baseline, "fit_seconds": round(time.perf_counter() - start, 1),
        "peak_bytes": max(v for k, v in monitor.peaks.items() if k != "build cohort"), "stages": log, "steps_log": step_log,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fit_memory.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(work)
    print(json.dumps({k: v for k, v in record.items() if k not in ("stages", "steps_log", "machine")}, indent=2))


if __name__ == "__main__":
    main()
