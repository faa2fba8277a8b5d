r"""Accuracy on the real HER2ST sections: methods and Gene-DML ablations on identical folds and features.

Drives `genedml.cv.run_cv` (the same code as `genedml cv`) for each backbone, target smoothing and split
family, then writes one JSON and one markdown table. The protocol of benchmarks/RESULTS.md's 0.8 and 0.9
sections (on a CPU the encoders are shrunk to "CPU sizes"; leave the five --head-options out on a GPU to run
every head setting at its default, the paper's sizes):

    python benchmarks/accuracy_her2st.py --data ../shared/data/her2st --backbones timm:resnet18,he-stats \
        --splits C-to-B4,loso-C --smooth off --models ridge-cv,genedml --ablations mlp --seeds 2021,2022,2023 \
        --head-option dim=128 --head-option neighbor_depth=1 --head-option neighbor_mlp_ratio=1.0 \
        --head-option global_depth=2 --head-option global_mlp_ratio=1.0

With real weights: `--backbones uni --weights /path/to/uni/pytorch_model.bin`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
SPLITS = {
    # leave-one-section-out within patient C, and train C2–C6 → test B4 across patients
    "loso-C": {"by": "sample", "samples": ["C2", "C3", "C4", "C5", "C6"], "test_samples": None},
    "C-to-B4": {"by": "sample", "samples": ["B4", "C2", "C3", "C4", "C5", "C6"], "test_samples": ["B4"]},
}
MODELS = ["ridge", "ridge-cv", "bleep", "triplex", "genedml"]
ABLATIONS = ["no-group", "no-instance", "no-global", "paper-scales", "cld"]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    import torch

    return {"cores": os.cpu_count(), "cpu": cpu, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version()}


def ensure_cache(data: Path, backbone: str, weights: str | None, work: Path, table: Path) -> Path:
    """One cache per backbone: local patch with dihedral views + lattice neighbourhood, native resolution, 224 px."""
    from genedml.extract.distributed import run_extraction_distributed
    from genedml.extract.runner import ExtractSettings

    cache = work / f"cache_{backbone.replace(':', '_')}"
    run_extraction_distributed(
        data, backbone=backbone, weights=Path(weights) if weights else None, random_init=weights is None and backbone != "he-stats",
        allow_download=False, cache_dir=cache, settings=ExtractSettings(augment="dihedral"), samples=None,
        read_kwargs={"samples_table": table}, progress=False,
    )
    return cache


def pick_folds(spec: dict, wanted: str | None) -> list[dict] | None:
    """The split's folds (as `run_cv` makes them) whose name is in `wanted`; None: all of them."""
    from genedml.cv import make_folds

    if not wanted:
        return None
    # make_folds reads only sample ids for splits by sample, so ids stand in for the read samples
    folds = make_folds([SimpleNamespace(sample_id=s) for s in spec["samples"]], spec["by"], spec["test_samples"])
    picked = [f for f in folds if f["name"] in wanted.split(",")]
    if not picked:
        raise SystemExit(f"--folds {wanted}: none of them is a fold of this split ({[f['name'] for f in folds]})")
    return picked


def main(argv: list[str] | None = None) -> None:
    from genedml.cv import CVSettings, check_settings, run_cv
    from genedml.errors import GenedmlError
    from genedml.jsonio import parse_key_values, write_json, write_text_atomic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "her2st")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--samples-table", type=Path, default=HERE / "her2st_samples.csv")
    ap.add_argument("--backbones", default="timm:resnet18,he-stats")
    ap.add_argument("--weights", default=None, help="weights for a single --backbones entry (omit: random-init)")
    ap.add_argument("--splits", default=",".join(SPLITS))
    ap.add_argument("--smooth", default="off,on", help="target smoothing settings to run: off, on or off,on")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--ablations", default=",".join(ABLATIONS))
    ap.add_argument("--retrieve-k", type=int, default=50)
    ap.add_argument("--blend", type=float, default=0.5)
    ap.add_argument("--folds", default=None, help="only these folds of each split, by test section (e.g. C5,C6; "
                    "each keeps the training sections it has in the full split)")
    ap.add_argument("--resume", action="store_true", help="keep the runs an interrupted call with the same --out and "
                    "settings finished (genedml cv --resume)")
    ap.add_argument("--seeds", default="2021,2022,2023")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--val-fraction", type=float, default=0.2, help="cv's --val-fraction: sections of each fold's training "
                    "set held out for early stopping (0: none; the neural heads train for --epochs on every training section)")
    ap.add_argument("--genes", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--head-option", action="append", default=[], help="KEY=VALUE head setting (repeatable)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "accuracy_her2st")
    args = ap.parse_args(argv)

    head = {"batch_size": args.batch_size, "lr": args.lr, **parse_key_values(args.head_option)}
    # Every cv setting (and --folds) is checked here, before the first cache is extracted: a bad value must not
    # wait for minutes of extraction to be refused.
    plans = {}
    for smooth in args.smooth.split(","):
        for split in args.splits.split(","):
            spec = SPLITS[split]
            settings = CVSettings(
                by=spec["by"], models=args.models.split(","), ablations=[a for a in args.ablations.split(",") if a],
                samples=spec["samples"], test_samples=spec["test_samples"], genes=args.genes, smooth=smooth == "on",
                epochs=args.epochs, val_fraction=args.val_fraction, seeds=[int(s) for s in args.seeds.split(",")], retrieve_k=args.retrieve_k,
                blend=args.blend, head=head,
            )
            try:
                check_settings(settings)
            except GenedmlError as exc:
                ap.error(str(exc))
            plans[smooth, split] = settings, pick_folds(spec, args.folds)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "date": started, "machine": machine(), "runs": []}
    md = []
    for backbone in args.backbones.split(","):
        t0 = time.perf_counter()
        cache = ensure_cache(args.data, backbone, args.weights, args.work, args.samples_table)
        for smooth in args.smooth.split(","):
            for split in args.splits.split(","):
                settings, folds = plans[smooth, split]
                out = args.out / backbone.replace(":", "_") / f"smooth-{smooth}" / split
                summary = run_cv(args.data, cache, out, settings, read_kwargs={"samples_table": args.samples_table},
                                 folds=folds, resume=args.resume)
                results["runs"].append({"backbone": backbone, "smooth": smooth, "split": split, "summary": summary})
                md.append(f"### {backbone} · smoothing {smooth} · {split}\n\n{summary['markdown']}")
                print(md[-1], flush=True)
                # After every split, not only at the end: a long call that stops keeps what it finished.
                write_json(args.out / "results.json", results)
                header = f"Command: `{results['command']}`  \nDate: {started}; machine: {results['machine']}\n\n"
                write_text_atomic(args.out / "results.md", header + "\n".join(md))
        print(f"{backbone}: {time.perf_counter() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
