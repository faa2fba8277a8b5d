"""Cohort scale: fit and predict cost on a synthetic cohort of N spots at D dimensions (issue "Cohort scale").

    python benchmarks/scale.py --spots N --dim D --out DIR [--batch-slides K] [--encoder-dim E] [--max-memory 8GB]

1. Builds a synthetic HEST-style cohort under DIR/work: `data/` (st/<id>.h5ad counts, metadata/<id>.json,
   wsis/<id>.png: a blank image, only its header is read) and `cache/`, written through the real cache writer
   (`FeatureCache.writing` → `SampleWriter`) with the arrays, attributes and store settings a real
   `genedml extract --augment dihedral` writes: `local` and its 8 dihedral views `local_aug` (float16), the
   lattice neighbourhood of the real geometry (`genedml.extract.geometry.lattice_neighbors`), barcodes,
   centres and array coordinates. Slides hold `--spots-per-slide` spots on a Visium hex grid (100 µm pitch)
   at `--mpp` µm/px with 224 px patches. Features carry a learnable signal: a spatially smooth latent field
   (8-d) is encoded linearly in every feature (plus noise) and drives expression through tanh.
2. Runs `genedml fit` (1 epoch, the CPU head sizes of the accuracy benchmark, batch 512; `--encoder-dim E`
   adds the head option encoder_dim=E, `--max-memory` streams the features from the cache) and
   `genedml predict --retrieve-k 50` in their own processes; each one's peak RSS comes from `os.wait4`.
3. Writes DIR/scale.json: spots, dim, cache_bytes (training samples' files), fit_peak_rss_bytes,
   fit_seconds_per_epoch (curve.json `seconds` / epochs: the head's training, without reading the cache),
   predict_spots_per_second (end to end, process start included), the issue's targets, machine, date,
   commit and the exact commands. DIR/work is removed unless --keep-work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PATCH_PX = 224
PITCH_UM = 100.0  # Visium centre-to-centre spot distance
LATENT = 8  # rank of the signal shared by features and expression
WAVES = 8  # plane waves per latent dimension (the tissue's smooth spatial structure)
RSS_SLACK_BYTES = 2 * 10**9  # target: fit peak RSS <= 2 x cache bytes + 2 GB
FIT_HEAD = {"dim": 128, "neighbor_depth": 1, "neighbor_mlp_ratio": 1.0, "global_depth": 2, "global_mlp_ratio": 1.0,
            "min_epoch_steps": 1}


# ----------------------------------------------------------------------------------------- synthetic cohort
def hex_layout(n: int, mpp: float) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Spot centres (level-0 px), Visium array coordinates (col, row) and image size of a near-square slide."""
    pitch = PITCH_UM / mpp
    cols = int(np.ceil(np.sqrt(n * 2 / np.sqrt(3))))
    row, col = np.divmod(np.arange(n), cols)
    margin = 2 * PATCH_PX
    x = margin + col * pitch + (row % 2) * pitch / 2
    y = margin + row * pitch * np.sqrt(3) / 2
    centers = np.stack([x, y], axis=1)
    grid = np.stack([2 * col + row % 2, row], axis=1).astype(np.int64)  # Visium: odd rows shifted by one column
    size = (int(np.ceil(x.max() + margin)), int(np.ceil(y.max() + margin)))
    return centers, grid, size


class Cohort:
    """The shared 'biology' and 'backbone': latent → feature map A (r, D) and latent → expression B (r, G)."""

    def __init__(self, dim: int, genes: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.dim, self.genes, self.seed = dim, genes, seed
        self.to_feature = (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
        self.to_expression = rng.standard_normal((LATENT, genes)).astype(np.float32)
        self.base = rng.normal(0.0, 1.0, genes).astype(np.float32)  # log mean expression per gene
        self.gene_names = np.array([f"GENE{g:05d}" for g in range(genes)])

    def slide(self, index: int, n: int, mpp: float) -> dict:
        """Arrays of one slide: cache arrays (float16 features, real lattice geometry) and integer counts."""
        from genedml.extract.geometry import lattice_neighbors

        rng = np.random.default_rng([self.seed, index])
        centers, grid, (width, height) = hex_layout(n, mpp)
        fov = PATCH_PX  # native resolution (the Gene-DML protocol): 224 level-0 px
        lattice = lattice_neighbors(centers, fov, width, height)
        # A smooth latent field per slide (wavelengths 0.3–3 mm), seen at spots and at lattice tile centres.
        wavelength = rng.uniform(300.0, 3000.0, (LATENT, WAVES))
        angle = rng.uniform(0, 2 * np.pi, (LATENT, WAVES))
        omega = 2 * np.pi / wavelength[..., None] * np.stack([np.cos(angle), np.sin(angle)], -1)  # (r, K, 2)
        phase = rng.uniform(0, 2 * np.pi, (LATENT, WAVES))

        def field(points_px: np.ndarray) -> np.ndarray:
            um = points_px * mpp
            return (np.cos(np.einsum("nc,rkc->nrk", um, omega) + phase).sum(-1) / np.sqrt(WAVES / 2)).astype(np.float32)

        latent = field(centers) + 0.5 * rng.standard_normal((n, LATENT), dtype=np.float32)  # + cell-level variation
        local = latent @ self.to_feature + rng.standard_normal((n, self.dim), dtype=np.float32)
        views = np.empty((n, 8, 1, self.dim), dtype=np.float16)
        views[:, 0, 0] = local
        for v in range(1, 8):  # the other dihedral views: the same patch, slightly different features
            views[:, v, 0] = local + 0.3 * rng.standard_normal((n, self.dim), dtype=np.float32)
        tile_centres = lattice.boxes[:, :2] + fov / 2.0
        tiles = field(tile_centres) @ self.to_feature + rng.standard_normal((len(tile_centres), self.dim), dtype=np.float32)
        log_rate = self.base + 1.5 * np.tanh(latent @ self.to_expression / np.sqrt(LATENT))
        rate = np.exp(log_rate)
        library = rng.lognormal(np.log(3000.0), 0.3, n)[:, None]
        counts = rng.poisson(rate / rate.sum(1, keepdims=True) * library).astype(np.int32)
        return {
            "centers": centers, "grid": grid, "size": (width, height), "fov": fov, "lattice": lattice,
            "local_aug": views, "tiles": tiles.astype(np.float16), "counts": counts,
        }


def cache_settings(dim: int) -> dict:
    """Store settings as a real `genedml extract --augment dihedral` writes them, for a 'synthetic' backbone."""
    from genedml.extract.runner import ExtractSettings

    provenance = {
        "backbone": "synthetic", "arch": None, "kind": "synthetic", "weights": "random-init", "weights_path": None,
        "dim": dim, "pooling": "cls", "input_size": PATCH_PX,
        "note": "synthetic features of benchmarks/scale.py (a smooth latent field + noise): no biology",
    }
    return ExtractSettings(augment="dihedral").cache_settings(provenance)


def write_sample(cache, data: Path, sample_id: str, slide: dict, cohort: Cohort, mpp: float, image: Path) -> None:
    """One slide into the cache (real writer, real array names and attrs) and into the HEST-style data folder."""
    import anndata
    import scipy.sparse as sp

    from genedml.cache import schema

    n = len(slide["centers"])
    barcodes = np.array([f"{sample_id}-{i:05d}" for i in range(n)])
    lattice = slide["lattice"]
    with cache.writing(sample_id) as writer:
        writer.write(schema.LOCAL_AUG, slide["local_aug"])
        writer.write(schema.LOCAL, slide["local_aug"][:, 0])
        writer.write(schema.LATTICE, slide["tiles"])
        writer.write(schema.LATTICE_BOXES, lattice.boxes)
        writer.write(schema.NEIGHBOR_INDEX, lattice.index)
        writer.write(schema.NEIGHBOR_MASK, lattice.mask)
        writer.write(schema.BARCODES, barcodes)
        writer.write(schema.CENTERS, slide["centers"])
        writer.write(schema.ARRAY_COORDS, slide["grid"])
        fov = slide["fov"]
        writer.attrs(
            sample_id=sample_id, patient_id=sample_id, patient_known=True, source="hest", image=str(image),
            image_size=list(slide["size"]), mpp=mpp, fov_px=fov, fov_um=fov * mpp, neighbor_fov_um=5 * fov * mpp,
            n_spots=n, local_token_weights=[197.0],  # a ViT-L/16 CLS token standing for 1 + 196 patch tokens (UNI)
            tiles_encoded={"local": n, "neighbor": len(lattice.boxes), "augment": 7 * n}, seconds=0.0,
        )
    obs = {"array_col": slide["grid"][:, 0], "array_row": slide["grid"][:, 1]}
    adata = anndata.AnnData(X=sp.csr_matrix(slide["counts"]), obs=obs)
    adata.obs_names = barcodes
    adata.var_names = cohort.gene_names
    adata.obsm["spatial"] = slide["centers"]
    adata.write_h5ad(data / "st" / f"{sample_id}.h5ad")
    (data / "metadata" / f"{sample_id}.json").write_text(json.dumps({"pixel_size_um_estimated": mpp, "patient": sample_id}))
    (data / "wsis" / f"{sample_id}.png").symlink_to(Path("..") / image.name)


def blank_image(data: Path, size: tuple[int, int]) -> Path:
    """A 1-bit blank PNG of `size` (readers open only its header: spot centres must lie on it)."""
    from PIL import Image

    path = data / f"blank_{size[0]}x{size[1]}.png"
    if not path.exists():
        Image.new("1", size, 1).save(path)
    return path


def build_cohort(root: Path, spots: int, dim: int, per_slide: int, genes: int, mpp: float, seed: int) -> dict:
    """The synthetic dataset (root/data) and feature cache (root/cache); returns what was built."""
    from genedml.cache.store import FeatureCache

    data, cache_dir = root / "data", root / "cache"
    for sub in ("st", "metadata", "wsis"):
        (data / sub).mkdir(parents=True, exist_ok=True)
    cache = FeatureCache(cache_dir, cache_settings(dim))
    cohort = Cohort(dim, genes, seed)
    start, tiles, ids = time.perf_counter(), 0, []
    for index, first in enumerate(range(0, spots, per_slide)):
        sample_id = f"S{index:04d}"
        slide = cohort.slide(index, min(per_slide, spots - first), mpp)
        write_sample(cache, data, sample_id, slide, cohort, mpp, blank_image(data, slide["size"]))
        tiles += len(slide["lattice"].boxes)
        ids.append(sample_id)
    return {"data": data, "cache": cache_dir, "samples": ids, "lattice_tiles_per_spot": tiles / spots,
            "build_seconds": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------------- measuring
def run_measured(cmd: list[str], log_path: Path) -> tuple[float, int]:
    """Run `cmd` in its own process; (wall seconds, peak RSS bytes of that process) via os.wait4."""
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(log_path, "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"command failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return wall, usage.ru_maxrss * 1024  # Linux reports kilobytes


def rss_target(cache_bytes: int, fit_rss: int, config: dict, max_memory: str | None) -> dict:
    """The issue's fit-memory target: ≤ 2 × cache + 2 GB in memory; streamed, ≤ --max-memory + 2 GB."""
    note = "fit peak RSS <= 2 x cache bytes + 2 GB (10^9 B); s/epoch/spot within ±25 % across N >= 25k (compare runs)"
    limit = 2 * cache_bytes + RSS_SLACK_BYTES
    if config.get("features_streamed"):
        from genedml.fit import parse_bytes

        limit = parse_bytes(max_memory) + RSS_SLACK_BYTES
        note = "streamed (--max-memory): fit peak RSS <= --max-memory + 2 GB (400k with 8GB: <= 10 GB)"
    return {"fit_peak_rss_max_bytes": limit, "fit_peak_rss_ok": fit_rss <= limit, "note": note}


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    return {"cpu_model": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "python": platform.python_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "niceness": os.nice(0)}


def git_commit() -> str:
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")


def startup_seconds(work: Path) -> float:
    """Wall time of a process that only imports what `genedml predict` imports (the fixed cost per run)."""
    code = "import genedml.cli, genedml.predict, genedml.retrieval, genedml.heads.gene_dml, genedml.output, faiss, anndata"
    wall, _ = run_measured([sys.executable, "-c", code], work / "startup.log")
    return wall


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spots", type=int, required=True, help="spots in the cohort (all used for training)")
    ap.add_argument("--dim", type=int, required=True, help="feature dimension D")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT/scale.json")
    ap.add_argument("--spots-per-slide", type=int, default=4000)
    ap.add_argument("--batch-slides", type=int, default=0, help="slide-aware batches (head setting batch_slides); 0 = off")
    ap.add_argument("--encoder-dim", type=int, default=0, help="head setting encoder_dim (0 = the scale encoders at width D, as the reference)")
    ap.add_argument("--max-memory", help="genedml fit --max-memory (e.g. 8GB): stream the features over this size")
    ap.add_argument("--genes", type=int, default=300, help="genes in the synthetic counts (the fit keeps its 250 panel)")
    ap.add_argument("--mpp", type=float, default=0.25, help="µm per pixel (224 px patches at native resolution)")
    ap.add_argument("--retrieve-k", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="where data, cache, model and predictions go (default OUT/work)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work folder (default: removed at the end)")
    ap.add_argument("--no-startup", action="store_true", help="skip timing the import-only process (tests)")
    args = ap.parse_args(argv)
    if args.spots < 1 or args.dim < 1 or args.spots_per_slide < 1:
        ap.error("--spots, --dim and --spots-per-slide must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    work = (args.work or args.out / "work").resolve()  # the subprocesses run in the repository root
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    record: dict = {"spots": args.spots, "dim": args.dim, "spots_per_slide": args.spots_per_slide,
                    "batch_slides": args.batch_slides, "encoder_dim": args.encoder_dim, "max_memory": args.max_memory, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                    "command": " ".join(["python", "benchmarks/scale.py", *(sys.argv[1:] if argv is None else argv)]),
                    "genedml_commit": git_commit(), "machine": machine(), "load_average": {"start": os.getloadavg()}}
    built = build_cohort(work, args.spots, args.dim, args.spots_per_slide, args.genes, args.mpp, args.seed)
    record.update(slides=len(built["samples"]), lattice_tiles_per_spot=round(built["lattice_tiles_per_spot"], 3),
                  build_seconds=round(built["build_seconds"], 2))

    from genedml.heads.gene_dml import SCALES  # the authors' three scales (not the default): memory includes the neighbour encoder

    genedml = [sys.executable, "-m", "genedml"]
    model, pred = work / "model", work / "pred"
    fit_cmd = [*genedml, "fit", "--cache", str(built["cache"]), "--data", str(built["data"]), "--out", str(model),
               "--val-fraction", "0", "--epochs", "1", "--batch-size", "512", "--seed", str(args.seed),
               "--scales", ",".join(SCALES)]
    if args.max_memory:
        fit_cmd += ["--max-memory", args.max_memory]
    head = {**FIT_HEAD, "batch_slides": args.batch_slides, "encoder_dim": args.encoder_dim}
    for key, value in head.items():
        fit_cmd += ["--head-option", f"{key}={value}"]
    fit_wall, fit_rss = run_measured(fit_cmd, work / "fit.log")
    record["load_average"]["after_fit"] = os.getloadavg()
    curve = json.loads((model / "curve.json").read_text())
    config = json.loads((model / "config.json").read_text())
    epochs = len(curve["epochs"])

    predict_cmd = [*genedml, "predict", str(model), "--cache", str(built["cache"]), "--out", str(pred),
                   "--retrieve-k", str(args.retrieve_k)]
    predict_wall, predict_rss = run_measured(predict_cmd, work / "predict.log")
    startup = None if args.no_startup else startup_seconds(work)
    record["load_average"]["end"] = os.getloadavg()

    cache_bytes = sum(tree_bytes(built["cache"] / s) for s in config["train_samples"])
    per_epoch = curve["seconds"] / epochs
    record.update({
        "cache_bytes": cache_bytes,
        "cache_bytes_per_spot": round(cache_bytes / config["n_train_spots"], 1),
        "train_spots": config["n_train_spots"],
        "fit_peak_rss_bytes": fit_rss,
        "fit_seconds_per_epoch": round(per_epoch, 3),
        "fit_seconds_per_epoch_per_spot": per_epoch / config["n_train_spots"],
        "fit_epochs": epochs,
        "fit_steps_per_epoch": curve["steps_per_epoch"],
        "fit_train_loss": curve["epochs"][-1].get("loss"),
        "fit_seconds_in_process": config["fit_seconds"],  # fit_model: read data + cache, train, bank, save
        "fit_wall_seconds": round(fit_wall, 2),
        "predict_peak_rss_bytes": predict_rss,
        "predict_wall_seconds": round(predict_wall, 2),
        "predict_spots_per_second": round(args.spots / predict_wall, 1),
        "predict_startup_seconds": None if startup is None else round(startup, 2),
        "predict_spots_per_second_after_startup": None if startup is None else round(args.spots / max(predict_wall - startup, 1e-9), 1),
        "retrieve_k": args.retrieve_k,
        "fit_command": " ".join(fit_cmd),
        "predict_command": " ".join(predict_cmd),
        "fit_features_streamed": bool(config.get("features_streamed")),
        "targets": rss_target(cache_bytes, fit_rss, config, args.max_memory),
    })
    (args.out / "scale.json").write_text(json.dumps(record, indent=2))
    gb = 1e9
    print(f"N={args.spots} D={args.dim} slides={record['slides']} batch_slides={args.batch_slides} encoder_dim={args.encoder_dim} "
          f"streamed={record['fit_features_streamed']}: cache {cache_bytes / gb:.2f} GB "
          f"({record['cache_bytes_per_spot']:.0f} B/spot), fit peak RSS {fit_rss / gb:.2f} GB "
          f"(target <= {record['targets']['fit_peak_rss_max_bytes'] / gb:.2f}), {per_epoch:.1f} s/epoch, "
          f"predict peak RSS {predict_rss / gb:.2f} GB, {record['predict_spots_per_second']:.0f} spots/s")
    if not args.keep_work:
        shutil.rmtree(work)
    return record


if __name__ == "__main__":
    main()
