"""`genedml extract`: encode every spot of every sample into the feature cache, resumably."""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

import genedml
from genedml.cache.store import FeatureCache, SampleWriter
from genedml.cache.verify import check_sample
from genedml.data.sample import Sample
from genedml.backbones.timm_encoder import ALL_TOKENS
from genedml.backbones.token_cells import cell_sizes
from genedml.data.spots import snap_to_grid
from genedml.devices import check_device, resolve_device
from genedml.errors import CacheLockedError, CacheMismatchError, ConfigError, GenedmlError, InputError
from genedml.extract.geometry import Geometry, exact_neighbor_boxes, lattice_neighbors, local_boxes
from genedml.extract.patches import dihedral_views, iter_patch_batches
from genedml.log import log
from genedml.typed import check_fields, flag_of


SCALES = ("local", "neighbor")
TOKEN_GRIDS = {"cls": 0, "2x2": 2, "4x4": 4, "all": ALL_TOKENS}


@dataclass(frozen=True)
class ExtractSettings:
    """What to extract. Everything that changes the features is recorded in the cache and compared."""

    patch_px: int = 224
    mpp_target: float | None = None
    scales: tuple[str, ...] = SCALES
    neighbor_mode: str = "lattice"
    local_tokens: str = "cls"
    augment: str | None = None
    dtype: str = "float16"
    batch_size: int = 64
    workers: int | None = None  # None: 1 reader thread on CPU (more compete with torch), several on CUDA
    device: str = "auto"

    def __post_init__(self) -> None:
        check_fields(self, flag_of)
        unknown = set(self.scales) - set(SCALES)
        if unknown or not self.scales or "local" not in self.scales:
            raise InputError(f"--scales must include 'local' and only {SCALES} (global is derived at fit time); got {self.scales}.")
        if self.neighbor_mode not in ("lattice", "exact"):
            raise InputError(f"--neighbor-mode must be 'lattice' or 'exact', got {self.neighbor_mode!r}.")
        if self.local_tokens not in TOKEN_GRIDS:
            raise InputError(f"--local-tokens must be one of {sorted(TOKEN_GRIDS)}, got {self.local_tokens!r}.")
        if self.augment not in (None, "dihedral"):
            raise InputError(f"--augment must be 'dihedral' or omitted, got {self.augment!r}.")
        if self.dtype not in ("float16", "float32"):
            raise InputError(f"--dtype must be float16 or float32, got {self.dtype!r}.")
        if self.patch_px <= 0 or (self.mpp_target is not None and self.mpp_target <= 0):
            raise InputError("--patch-px and --mpp-target must be positive.")
        if self.batch_size < 1:  # the type is checked above
            raise ConfigError(f"--batch-size must be an integer >= 1 (patches per model call), got {self.batch_size!r}.")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0 (0 = read patches in the main thread), got {self.workers!r}.")
        check_device(self.device)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.patch_px, self.mpp_target)

    def cache_settings(self, backbone_provenance: dict[str, Any]) -> dict[str, Any]:
        """The store-level settings: backbone provenance + geometry (not batch size, workers or device)."""
        return {
            **backbone_provenance,
            "patch_px": self.patch_px,
            "mpp_target": self.mpp_target,
            "scales": list(self.scales),
            "neighbor_mode": self.neighbor_mode if "neighbor" in self.scales else None,
            "neighbor_grid": 5,
            "local_tokens": self.local_tokens,
            # Grid cells partition the token map since 0.4 (0.3 pooled overlapping cells): never mix the two.
            **({"cell_pooling": "partition"} if TOKEN_GRIDS[self.local_tokens] > 0 else {}),
            "augment": self.augment,
            "dtype": self.dtype,
            "versions": {"genedml": genedml.__version__, "torch": torch.__version__, "python": platform.python_version()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


@dataclass
class SampleReport:
    sample_id: str
    status: str  # "extracted" | "skipped" (complete) | "locked" (another process is writing it)
    spots: int
    tiles_local: int = 0
    tiles_neighbor: int = 0
    tiles_augment: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tiles_per_spot(self) -> float:
        return (self.tiles_local + self.tiles_neighbor) / max(1, self.spots)


def reader_threads(device: torch.device) -> int:
    """Default patch-reader threads: on a CPU they compete with the model's threads, so one (measured on
    2 cores: extraction / raw forward 0.93 with 1 reader, 0.89 with 0, 0.78 with 2); a GPU wants several."""
    import os

    return 1 if device.type == "cpu" else max(2, min(8, (os.cpu_count() or 2) // 2))


class Encoder:
    """Runs a backbone over boxes of one image, with read-ahead, into a preallocated output array."""

    def __init__(self, backbone: Any, settings: ExtractSettings, device: torch.device, on_batch: Callable[[int], None]):
        self.backbone = backbone
        self.settings = settings
        self.device = device
        self.on_batch = on_batch
        self.workers = settings.workers if settings.workers is not None else reader_threads(device)
        self.heartbeat: Callable[[], None] = lambda: None  # set per sample: keeps the sample's lock fresh
        self.out_dtype = np.dtype(settings.dtype)

    def encode(self, image: Any, boxes: np.ndarray, token_grid: int = 0, views: bool = False) -> np.ndarray:
        """(M, T, D) features of `boxes` — or (M, 8, T, D) with `views` (dihedral augmentation)."""
        s = self.settings
        n_tokens = 1 + (self.backbone.native_tokens if token_grid == ALL_TOKENS else token_grid**2)
        dim = self.backbone.dim
        shape = (len(boxes), 8, n_tokens, dim) if views else (len(boxes), n_tokens, dim)
        out = np.zeros(shape, dtype=self.out_dtype)
        # With 8 views per patch, read 8x fewer patches per batch so the model batch size stays the same.
        per_batch = max(1, s.batch_size // 8) if views else s.batch_size
        pin = self.device.type == "cuda"
        row = 0
        for batch in iter_patch_batches(image, boxes, s.patch_px, per_batch, self.workers, pin_memory=pin):
            b = len(batch)
            x = dihedral_views(batch).flatten(0, 1) if views else batch
            feats = self.backbone.encode(x.to(self.device, non_blocking=True), token_grid=token_grid)
            feats = feats.float().cpu().numpy()
            out[row : row + b] = feats.reshape((b, 8, n_tokens, dim) if views else (b, n_tokens, dim))
            row += b
            self.on_batch(len(x))
            self.heartbeat()
        return out


def local_token_weights(token_grid: int, native_tokens: int | None) -> list[float] | None:
    """How many backbone tokens each cached local token stands for (None for a backbone without a token map).

    The reference model fuses CLS + every patch token; a compact cache keeps fewer. Counting the pooled token
    as the whole patch (cls) or each grid cell as its own tokens (`token_cells`: cells of a 14 x 14 map on a
    4 x 4 grid hold 9, 12 or 16) lets the head weight them so the local patch keeps its share of the fused
    sequence (proportional attention, weighted means).
    """
    if native_tokens is None:
        return None
    if token_grid == 0:
        return [1.0 + native_tokens]
    if token_grid == ALL_TOKENS:
        return [1.0] * (1 + native_tokens)
    side = math.isqrt(native_tokens)
    if side * side != native_tokens:  # patches are square, so their token maps are
        raise GenedmlError(f"a square patch gave {native_tokens} tokens, which is not a square token map")
    return [1.0] + [float(n) for n in cell_sizes(side, side, token_grid)]


def extract_sample(sample: Sample, encoder: Encoder, settings: ExtractSettings, writer: SampleWriter) -> SampleReport:
    """Encode one sample's local (and neighbour) scales and write them with the writer."""
    start = time.perf_counter()
    fov = settings.geometry.fov_px(sample.mpp)
    image = sample.image
    token_grid = TOKEN_GRIDS[settings.local_tokens]
    report = SampleReport(sample.sample_id, "extracted", sample.n_spots)
    encoder.heartbeat = writer.heartbeat  # type: ignore[attr-defined]

    boxes = local_boxes(sample.centers, fov)
    if settings.augment == "dihedral":
        aug = encoder.encode(image, boxes, token_grid, views=True)
        writer.write("local_aug", aug)
        writer.write("local", aug[:, 0])
        report.tiles_local = len(boxes)
        report.tiles_augment = 7 * len(boxes)
    else:
        writer.write("local", encoder.encode(image, boxes, token_grid))
        report.tiles_local = len(boxes)

    if "neighbor" in settings.scales:
        if settings.neighbor_mode == "exact":
            nboxes, mask = exact_neighbor_boxes(sample.centers, fov, image.width, image.height)
            feats = np.zeros((sample.n_spots, 25, encoder.backbone.dim), dtype=encoder.out_dtype)
            feats[mask] = encoder.encode(image, nboxes[mask])[:, 0]  # off-image tiles are not encoded
            writer.write("neighbor", feats)
            writer.write("neighbor_mask", mask)
            report.tiles_neighbor = int(mask.sum())
        else:
            lattice = lattice_neighbors(sample.centers, fov, image.width, image.height)
            writer.write("lattice", encoder.encode(image, lattice.boxes)[:, 0])
            writer.write("lattice_boxes", lattice.boxes)
            writer.write("neighbor_index", lattice.index)
            writer.write("neighbor_mask", lattice.mask)
            report.tiles_neighbor = len(lattice.boxes)

    weights = local_token_weights(token_grid, getattr(encoder.backbone, "native_tokens", None))
    writer.write("barcodes", sample.barcodes)
    writer.write("centers", sample.centers)
    # Always recorded, so readers never have to guess the spot grid (global positional encoding, smoothing).
    grid = sample.array_coords if sample.array_coords is not None else snap_to_grid(sample.centers)
    writer.write("array_coords", grid)
    report.seconds = time.perf_counter() - start
    writer.attrs(
        sample_id=sample.sample_id,
        patient_id=sample.patient_id,
        patient_known=sample.patient_known,
        source=sample.source,
        image=str(image.path),
        image_size=[image.width, image.height],
        mpp=sample.mpp,
        fov_px=fov,
        fov_um=fov * sample.mpp,
        neighbor_fov_um=5 * fov * sample.mpp,
        n_spots=sample.n_spots,
        local_token_weights=weights,
        tiles_encoded={"local": report.tiles_local, "neighbor": report.tiles_neighbor, "augment": report.tiles_augment},
        seconds=round(report.seconds, 3),
    )
    return report


def check_cached_sample(cache: FeatureCache, sample: Sample) -> None:
    """A complete cached sample must hold the same spots as the data now says (join is by barcode)."""
    cached = cache.read(sample.sample_id, names=["barcodes"]).barcodes
    if len(cached) != sample.n_spots or not np.array_equal(np.sort(cached), np.sort(sample.barcodes)):
        missing = np.setdiff1d(sample.barcodes, cached)
        raise CacheMismatchError(
            f"Cached sample '{sample.sample_id}' in {cache.root} holds {len(cached)} spots but the data has "
            f"{sample.n_spots} ({len(missing)} not in the cache, e.g. {list(missing[:5])}). "
            "The data changed since extraction: re-run with --overwrite."
        )


def run_extraction(
    samples: Sequence[Sample],
    backbone: Any,
    cache_dir: str | Path,
    settings: ExtractSettings,
    *,
    overwrite: bool = False,
    progress: Any | None = None,
) -> list[SampleReport]:
    """Extract `samples` into the cache at `cache_dir`; complete samples are skipped unless `overwrite`.

    Independent processes may run this on one cache (a job array): a sample another live process is
    writing is skipped with status "locked" (see `reports_summary`), not an error.
    `progress` is an optional object with `start(total_spots)`, `sample(sample_id, total_tiles)`,
    `advance(n_tiles)`, `sample_done(report)` (the CLI passes a rich progress bar).
    """
    device = resolve_device(settings.device)
    if settings.local_tokens == "all" and getattr(backbone, "native_tokens", None) is None:
        raise InputError(f"--local-tokens all needs a backbone with a patch-token map; {backbone.spec.name} has none "
                         "(use cls, 2x2 or 4x4).")
    cache = FeatureCache(cache_dir, settings.cache_settings(backbone.provenance()))
    if progress is not None:
        progress.start(sum(s.n_spots for s in samples))
    encoder = Encoder(backbone, settings, device, on_batch=(progress.advance if progress else lambda n: None))
    reports = []
    for sample in samples:
        if not overwrite and is_usable(cache, sample):
            log.info("skip %s: already complete in %s (use --overwrite to redo)", sample.sample_id, cache.root)
            report = SampleReport(sample.sample_id, "skipped", sample.n_spots)
        else:
            if progress is not None:
                progress.sample(sample.sample_id, planned_tiles(sample, settings))
            try:
                report = _extract_locked(cache, sample, encoder, settings, overwrite)
            except CacheLockedError as exc:
                log.info("skip %s: %s", sample.sample_id, exc)
                report = SampleReport(sample.sample_id, "locked", sample.n_spots)
            release = getattr(sample.image, "release", None)
            if release is not None:
                release()  # free the decoded slide before the next sample
        if progress is not None:
            progress.sample_done(report)
        reports.append(report)
    return reports


def is_usable(cache: FeatureCache, sample: Sample) -> bool:
    """Complete with all chunk files present and the data's spots; a damaged sample is logged and redone."""
    if not cache.is_complete(sample.sample_id):
        return False
    check = check_sample(cache, sample.sample_id)
    if not check.ok:
        log.warning("%s is damaged in %s (%s): extracting it again", sample.sample_id, cache.root, "; ".join(check.problems))
        return False
    check_cached_sample(cache, sample)
    return True


def _extract_locked(cache: FeatureCache, sample: Sample, encoder: Encoder, settings: ExtractSettings, overwrite: bool) -> SampleReport:
    """Extract one sample under its lock (unless another process completed it meanwhile)."""
    with cache.writing(sample.sample_id) as writer:
        if not overwrite and cache.is_complete(sample.sample_id) and check_sample(cache, sample.sample_id).ok:
            writer.abandon()  # finished by another process between our check and taking the lock
            log.info("skip %s: completed by another process", sample.sample_id)
            return SampleReport(sample.sample_id, "skipped", sample.n_spots)
        report = extract_sample(sample, encoder, settings, writer)
    log.info(
        "%s: %d spots, %d local + %d neighbour tiles encoded (%.2f per spot) in %.1fs",
        sample.sample_id, report.spots, report.tiles_local, report.tiles_neighbor, report.tiles_per_spot, report.seconds,
    )
    return report


def planned_tiles(sample: Sample, settings: ExtractSettings) -> int:
    """How many model inputs a sample will cost (for the progress bar)."""
    fov = settings.geometry.fov_px(sample.mpp)
    n = sample.n_spots * (8 if settings.augment == "dihedral" else 1)
    if "neighbor" in settings.scales:
        if settings.neighbor_mode == "exact":
            n += int(exact_neighbor_boxes(sample.centers, fov, sample.image.width, sample.image.height)[1].sum())
        else:
            n += len(lattice_neighbors(sample.centers, fov, sample.image.width, sample.image.height).boxes)
    return n


def reports_summary(reports: Sequence[SampleReport | dict[str, Any]]) -> dict[str, Any]:
    """Totals over sample reports (objects or their dicts, e.g. gathered from several ranks).

    "samples_skipped" counts samples already complete; "locked" lists those skipped because another
    process was writing them (they are done only if that process finishes).
    """
    rows = [r if isinstance(r, dict) else asdict(r) for r in reports]
    done = [r for r in rows if r["status"] == "extracted"]
    spots = sum(r["spots"] for r in done)
    seconds = sum(r["seconds"] for r in done)
    return {
        "samples_extracted": len(done),
        "samples_skipped": sum(r["status"] == "skipped" for r in rows),
        "locked": [r["sample_id"] for r in rows if r["status"] == "locked"],
        "spots": spots,
        "seconds": round(seconds, 2),
        "spots_per_s": round(spots / seconds, 2) if seconds else None,
        "tiles_per_spot": round(sum(r["tiles_local"] + r["tiles_neighbor"] for r in done) / spots, 3) if spots else None,
        "reports": rows,
    }
