"""Extraction across processes and nodes, launched by `torchrun` (one rank per device).

Each rank takes a share of the samples balanced by spot count, writes its samples' groups into the same
zarr store (per-sample locks and atomic renames make this safe), and rank 0 waits for all ranks and
writes `manifest.json`. Without torchrun's environment it is a plain single-process run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist

from genedml.cache.store import FeatureCache
from genedml.data.sample import Sample
from genedml.extract.runner import ExtractSettings, reports_summary, resolve_device, run_extraction

log = logging.getLogger("genedml")


def shard_by_spots(spot_counts: Sequence[int], world_size: int) -> list[list[int]]:
    """Assign sample indices to ranks, largest first to the least-loaded rank (LPT scheduling).

    Guarantees every rank's load ≤ mean share + the largest sample. Each rank's indices are returned in
    ascending order, so a rank processes its samples in the dataset's order.
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    loads = np.zeros(world_size, dtype=np.int64)
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(spot_counts)), key=lambda j: (-spot_counts[j], j)):
        rank = int(np.argmin(loads))  # ties → lowest rank, deterministic on every rank
        shards[rank].append(i)
        loads[rank] += spot_counts[i]
    return [sorted(s) for s in shards]


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def run_extraction_distributed(
    data: Path,
    *,
    backbone: str,
    weights: Path | None,
    random_init: bool,
    allow_download: bool,
    cache_dir: Path,
    settings: ExtractSettings,
    samples: list[str] | None,
    read_kwargs: dict[str, Any],
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any] | None:
    """Read samples, load the backbone, and extract this rank's share. Returns the summary on rank 0."""
    from dataclasses import replace

    from genedml.backbones import load_backbone
    from genedml.data import read_samples
    from genedml.progress import ExtractionProgress

    rank, world, local_rank = dist_env()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and settings.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(hours=12))
    device = str(resolve_device(settings.device))
    if world > 1 and device.startswith("cuda"):
        device = f"cuda:{local_rank}"  # one device per rank
        torch.cuda.set_device(local_rank)
    settings = replace(settings, device=device)

    all_samples = read_samples(data, samples=samples, **{k: v for k, v in read_kwargs.items() if v is not None})
    shard = shard_by_spots([s.n_spots for s in all_samples], world)[rank]
    mine = [all_samples[i] for i in shard]
    if world > 1:
        log.info("rank %d/%d: %d samples, %d spots", rank, world, len(mine), sum(s.n_spots for s in mine))

    model = load_backbone(backbone, weights=weights, random_init=random_init, device=device, allow_download=allow_download)
    show = progress and rank == 0
    if show:
        with ExtractionProgress() as bar:
            reports = run_extraction(mine, model, cache_dir, settings, overwrite=overwrite, progress=bar)
    else:
        reports = run_extraction(mine, model, cache_dir, settings, overwrite=overwrite)

    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, reports_summary(reports))
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return None
        merged = [r for part in gathered for r in part["reports"]]
    else:
        merged = reports_summary(reports)["reports"]
    summary = write_manifest(cache_dir, all_samples, merged, world)
    summary["weights"] = model.provenance().get("weights")
    return summary


def write_manifest(cache_dir: Path, samples: Sequence[Sample], reports: list[dict[str, Any]], world_size: int) -> dict[str, Any]:
    """Check every sample is complete in the store and record what was done (rank 0 only)."""
    cache = FeatureCache(cache_dir)
    missing = [s.sample_id for s in samples if not cache.is_complete(s.sample_id)]
    summary = reports_summary(reports)
    summary.pop("reports")
    manifest = {
        "complete": not missing,
        "missing": missing,
        "world_size": world_size,
        "samples": {s.sample_id: s.n_spots for s in samples},
        "last_run": {**summary, "reports": list(reports), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "settings": cache.settings,
    }
    tmp = Path(cache_dir) / f".manifest.{os.getpid()}.json"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, Path(cache_dir) / "manifest.json")
    if missing:
        log.warning("cache %s is missing %d samples: %s (re-run extract to finish them)", cache_dir, len(missing), missing)
    return summary
