"""Extraction across processes and nodes, launched by `torchrun` (one rank per device).

Each rank takes a share of the samples balanced by spot count, writes its samples' groups into the same
zarr store (per-sample locks and atomic renames make this safe), and rank 0 waits for all ranks and
writes `manifest.json`. Without torchrun's environment it is a plain single-process run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from genedml.cache.store import FeatureCache, check_cache_path
from genedml.data.sample import Sample
from genedml.errors import GenedmlError
from genedml.extract.geometry import check_patch_geometry
from genedml.devices import resolve_device
from genedml.extract.runner import ExtractSettings, reports_summary, run_extraction
from genedml.log import log



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
    allow_unusual_mpp: bool = False,
) -> dict[str, Any] | None:
    """Read samples, load the backbone, and extract this rank's share. Returns the summary on rank 0.

    A rank that fails still joins the final gather with its error, so the other ranks do not wait until
    the collective timeout; rank 0 then records the error in the manifest and every rank raises.
    """
    rank, world, local_rank = dist_env()
    own_group = world > 1 and not dist.is_initialized()
    if world > 1 and settings.device != "cpu" and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # before init: NCCL collectives use the current device
    if own_group:
        backend = "nccl" if torch.cuda.is_available() and settings.device != "cpu" else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(hours=12))
    try:
        with _rank_log_prefix(rank, world), _sigterm_unwinds():
            all_samples, summary, failure = _extract_share(
                data, backbone=backbone, weights=weights, random_init=random_init, allow_download=allow_download,
                cache_dir=cache_dir, settings=settings, samples=samples, read_kwargs=read_kwargs,
                overwrite=overwrite, progress=progress, rank=rank, world=world, local_rank=local_rank,
                allow_unusual_mpp=allow_unusual_mpp,
            )
            parts = _gather(summary, failure, rank, world)
    finally:
        if own_group:
            dist.destroy_process_group()

    errors = {r: p["error"] for r, p in enumerate(parts) if p["error"]}
    result = None
    # No store at all when every rank failed before its first sample (e.g. missing weights): no manifest.
    if rank == 0 and all_samples is not None and (Path(cache_dir) / "zarr.json").is_file():
        merged = [r for p in parts for r in p["reports"]]
        result = write_manifest(cache_dir, all_samples, merged, world, errors=errors)
        result["weights"] = summary.get("weights")
    if failure is not None:
        raise failure
    if errors:
        first = min(errors)
        raise GenedmlError(
            f"extraction failed on {len(errors)} of {world} ranks (rank {first}: {errors[first]}). Samples the "
            f"ranks finished are complete in {cache_dir}; fix the cause and re-run the same command to finish the rest."
        )
    return result


def _extract_share(
    data: Path, *, backbone: str, weights: Path | None, random_init: bool, allow_download: bool, cache_dir: Path,
    settings: ExtractSettings, samples: list[str] | None, read_kwargs: dict[str, Any], overwrite: bool,
    progress: bool, rank: int, world: int, local_rank: int, allow_unusual_mpp: bool = False,
) -> tuple[list[Sample] | None, dict[str, Any], BaseException | None]:
    """This rank's work: (all samples or None, its summary, the exception it hit or None)."""
    from dataclasses import replace

    from genedml.backbones import load_backbone
    from genedml.data import read_samples
    from genedml.progress import ExtractionProgress

    all_samples: list[Sample] | None = None
    reports: list[Any] = []
    summary: dict[str, Any] = {"reports": [], "weights": None}
    try:
        check_cache_path(Path(cache_dir))  # before reading data or loading a model
        device = str(resolve_device(settings.device))
        if world > 1 and device.startswith("cuda"):
            device = f"cuda:{local_rank}"  # one device per rank
        settings = replace(settings, device=device)
        all_samples = read_samples(data, samples=samples, **{k: v for k, v in read_kwargs.items() if v is not None})
        for sample in all_samples:  # before loading a model: a wrong mpp fails (or warns) here, not mid-extraction
            check_patch_geometry(sample.sample_id, sample.mpp, sample.image.width, sample.image.height, settings.geometry,
                                 allow_unusual=allow_unusual_mpp)
        mine = [all_samples[i] for i in shard_by_spots([s.n_spots for s in all_samples], world)[rank]]
        if world > 1:
            log.info("%d samples, %d spots", len(mine), sum(s.n_spots for s in mine))
        model = load_backbone(backbone, weights=weights, random_init=random_init, device=device, allow_download=allow_download)
        summary["weights"] = model.provenance().get("weights")
        if progress and rank == 0:  # one bar (rank 0's share); other ranks report per sample in the log
            with ExtractionProgress() as bar:
                reports = run_extraction(mine, model, cache_dir, settings, overwrite=overwrite, progress=bar)
        else:
            reports = run_extraction(mine, model, cache_dir, settings, overwrite=overwrite)
    except Exception as exc:  # noqa: BLE001 — re-raised by the caller after the other ranks were told
        if world == 1:
            raise
        log.error("failed: %s: %s", type(exc).__name__, exc)
        return all_samples, summary, exc
    summary["reports"] = reports_summary(reports)["reports"]
    return all_samples, summary, None


def _gather(summary: dict[str, Any], failure: BaseException | None, rank: int, world: int) -> list[dict[str, Any]]:
    """Every rank's reports and error (None when fine), in rank order."""
    part = {"reports": summary["reports"], "error": None if failure is None else f"{type(failure).__name__}: {failure}"}
    if world == 1:
        return [part]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, part)
    return gathered


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, world: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}/{world}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


@contextmanager
def _rank_log_prefix(rank: int, world: int) -> Iterator[None]:
    """Prefix log lines with the rank while several ranks write to the same terminal."""
    if world == 1:
        yield
        return
    rank_filter = _RankFilter(rank, world)
    log.addFilter(rank_filter)
    try:
        yield
    finally:
        log.removeFilter(rank_filter)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so `finally` blocks release sample locks and remove staging groups.

    torchrun stops the surviving ranks with SIGTERM when one fails; a lock left by a process on another
    host is only taken over after STALE_LOCK_SECONDS, so a re-run elsewhere would otherwise be refused.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_manifest(
    cache_dir: Path, samples: Sequence[Sample], reports: list[dict[str, Any]], world_size: int,
    errors: dict[int, str] | None = None,
) -> dict[str, Any]:
    """Check every sample is complete in the store and record what was done (rank 0 only)."""
    cache = FeatureCache(cache_dir)
    missing = [s.sample_id for s in samples if not cache.is_complete(s.sample_id)]
    summary = reports_summary(reports)
    summary.pop("reports")
    manifest = {
        "complete": not missing,
        "missing": missing,
        "world_size": world_size,
        "errors": {str(rank): msg for rank, msg in (errors or {}).items()},
        "samples": {s.sample_id: s.n_spots for s in samples},
        "last_run": {**summary, "reports": list(reports), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "settings": cache.settings,
    }
    tmp = Path(cache_dir) / f".manifest.{os.getpid()}.json"
    try:
        tmp.write_text(json.dumps(manifest, indent=2, default=str))
        os.replace(tmp, Path(cache_dir) / "manifest.json")
    except OSError as exc:  # e.g. a read-only cache whose samples were all complete: nothing else to write
        log.warning("could not write %s: %s", Path(cache_dir) / "manifest.json", exc.strerror or exc)
    if missing:
        log.warning("cache %s is missing %d samples: %s (re-run extract to finish them)", cache_dir, len(missing), missing)
    return summary
