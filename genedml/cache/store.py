"""The feature cache: one zarr v3 store per (backbone, geometry), one group per sample.

Layout on disk::

    CACHE/zarr.json                 root group; attrs["settings"] = what every sample was made with
    CACHE/<sample_id>/              one complete sample (a zarr group; attrs["complete"] = True)
    CACHE/.staging/<sample_id>.<pid>/   a sample being written (never visible as a sample)
    CACHE/.locks/<sample_id>.lock   who is writing a sample right now

A sample is written under `.staging`, marked complete, then renamed into place with one `os.rename`,
so a killed writer leaves nothing that looks complete. Settings that change the features (backbone,
weights, geometry, dtype) are compared on every open: a mismatch is an error naming the setting.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from genedml.errors import CacheLockedError, CacheMismatchError, InputError

FORMAT_VERSION = 1
# Settings that do not change the features: recorded, never compared.
INFORMATIONAL_KEYS = {"versions", "created", "weights_path", "format_version", "description", "precision", "note", "timm", "torch", "genedml"}
STALE_LOCK_SECONDS = 600.0  # a lock from another host whose heartbeat is older than this is taken over
CHUNK_BYTES = 4 << 20


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in INFORMATIONAL_KEYS}


def jsonable(value: Any) -> Any:
    """JSON round-trip: tuples become lists, numpy scalars Python numbers, anything else its str()."""
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def settings_diff(stored: dict[str, Any], requested: dict[str, Any], ignore: frozenset[str] = frozenset()) -> list[str]:
    """Human-readable differences between two settings dicts (only feature-relevant keys, minus `ignore`)."""
    a, b = jsonable(_comparable(stored)), jsonable(_comparable(requested))
    keys = sorted((set(a) | set(b)) - ignore)
    return [f"{k}: cache has {a.get(k)!r}, this run asks for {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _row_chunks(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk along rows only, about CHUNK_BYTES per chunk."""
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * itemsize)
    rows = int(max(1, min(shape[0] if shape[0] else 1, CHUNK_BYTES // row_bytes)))
    return (rows, *shape[1:])


@dataclass
class CachedSample:
    """All arrays and attributes of one complete cached sample, loaded into memory."""

    sample_id: str
    attrs: dict[str, Any]
    arrays: dict[str, np.ndarray]

    @property
    def barcodes(self) -> np.ndarray:
        return np.array(self.arrays["barcodes"].tolist(), dtype=str)  # zarr returns numpy StringDType

    @property
    def local(self) -> np.ndarray:
        return self.arrays["local"]

    def neighbor(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(N, 25, D) neighbour features and (N, 25) validity mask, gathered from the lattice if needed."""
        if "neighbor" in self.arrays:
            return self.arrays["neighbor"], self.arrays["neighbor_mask"].astype(bool)
        if "lattice" in self.arrays:
            index = self.arrays["neighbor_index"]
            mask = self.arrays["neighbor_mask"].astype(bool)
            lattice = self.arrays["lattice"]
            feats = lattice[np.clip(index, 0, None)]
            feats[~mask] = 0
            return feats, mask
        return None


class SampleWriter:
    """Writes the arrays of one sample into its staging group; `FeatureCache.writing` commits it."""

    def __init__(self, group: zarr.Group) -> None:
        self.group = group

    def write(self, name: str, data: np.ndarray) -> None:
        data = np.asarray(data)
        if data.dtype.kind in "US" or data.dtype == object:
            arr = self.group.create_array(name, shape=data.shape, dtype=str, chunks=data.shape or (1,))
            arr[:] = data.astype(object)
            return
        arr = self.group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=_row_chunks(data.shape, data.dtype.itemsize))
        arr[...] = data

    def attrs(self, **values: Any) -> None:
        self.group.attrs.update(jsonable(values))


class FeatureCache:
    """A feature store at `root`; open with the settings of the run (or none, to read)."""

    def __init__(self, root: str | Path, settings: dict[str, Any] | None = None, *, create: bool = True) -> None:
        self.root = Path(root)
        marker = self.root / "zarr.json"
        if marker.is_file():
            group = zarr.open_group(str(self.root), mode="r")
            stored = dict(group.attrs.get("settings", {}))
            if not stored:
                raise InputError(f"{self.root} is a zarr store but not a genedml feature cache (no settings).")
            if settings is not None:
                diff = settings_diff(stored, settings)
                if diff:
                    raise CacheMismatchError(
                        f"Feature cache {self.root} was made with other settings:\n  - " + "\n  - ".join(diff)
                        + "\nUse another --cache directory for these settings (one store per backbone and geometry)."
                    )
            self.settings = stored
        elif settings is None or not create:
            raise InputError(f"No feature cache at {self.root} (expected {marker}). Run `genedml extract` first.")
        else:
            self.root.mkdir(parents=True, exist_ok=True)
            settings = jsonable({**settings, "format_version": FORMAT_VERSION})
            self._create_root(settings)
            self.settings = settings

    def _create_root(self, settings: dict[str, Any]) -> None:
        # Several ranks may create the store at once: write to a temp file and rename (last one wins,
        # all write identical settings), then re-read and compare.
        tmp = self.root / f".zarr.json.{os.getpid()}.{socket.gethostname()}"
        tmp.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"settings": settings}}, indent=2))
        os.replace(tmp, self.root / "zarr.json")

    # ----------------------------------------------------------------- reading
    def sample_dir(self, sample_id: str) -> Path:
        if not sample_id or "/" in sample_id or sample_id.startswith("."):
            raise InputError(f"Invalid sample id for a cache group: {sample_id!r}.")
        return self.root / sample_id

    def is_complete(self, sample_id: str) -> bool:
        meta = self.sample_dir(sample_id) / "zarr.json"
        if not meta.is_file():
            return False
        return bool(json.loads(meta.read_text()).get("attributes", {}).get("complete", False))

    def samples(self) -> list[str]:
        """Ids of the complete samples, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".") and self.is_complete(p.name))

    def sample_attrs(self, sample_id: str) -> dict[str, Any]:
        self._require(sample_id)
        return dict(zarr.open_group(str(self.sample_dir(sample_id)), mode="r").attrs)

    def read(self, sample_id: str, names: list[str] | None = None) -> CachedSample:
        """Load a complete sample (all arrays, or only `names`)."""
        self._require(sample_id)
        group = zarr.open_group(str(self.sample_dir(sample_id)), mode="r")
        keys = [k for k in group.array_keys() if names is None or k in names]
        return CachedSample(sample_id, dict(group.attrs), {k: np.asarray(group[k][...]) for k in keys})

    def _require(self, sample_id: str) -> None:
        if not self.is_complete(sample_id):
            known = ", ".join(self.samples()) or "none"
            raise InputError(f"Sample '{sample_id}' is not complete in cache {self.root} (complete: {known}).")

    # ----------------------------------------------------------------- writing
    def remove(self, sample_id: str) -> None:
        path = self.sample_dir(sample_id)
        if path.exists():
            trash = self.root / ".staging" / f"{sample_id}.removed.{os.getpid()}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, trash)  # atomic: the sample disappears at once, then is deleted
            shutil.rmtree(trash, ignore_errors=True)

    @contextmanager
    def writing(self, sample_id: str) -> Iterator[SampleWriter]:
        """Lock a sample, yield a writer on a staging group, and publish it atomically on success."""
        with self.lock(sample_id) as heartbeat:
            staging = self.root / ".staging" / f"{sample_id}.{os.getpid()}"
            if staging.exists():
                shutil.rmtree(staging)
            staging.parent.mkdir(parents=True, exist_ok=True)
            group = zarr.open_group(str(staging), mode="w")
            writer = SampleWriter(group)
            writer.heartbeat = heartbeat  # type: ignore[attr-defined]
            try:
                yield writer
                group.attrs.update({"complete": True, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                self.remove(sample_id)
                os.rename(staging, self.sample_dir(sample_id))
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    @contextmanager
    def lock(self, sample_id: str) -> Iterator[Any]:
        """An exclusive per-sample lock file; stale locks of dead writers are taken over.

        Yields a heartbeat function that refreshes the lock's mtime (called by long writers), so a lock
        held by a live process on another host is recognisable as alive.
        """
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        path = locks / f"{sample_id}.lock"
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._lock_is_stale(path):
                    path.unlink(missing_ok=True)
                    self._clean_staging(sample_id)
                    continue
                raise CacheLockedError(
                    f"Sample '{sample_id}' in {self.root} is being written by another process "
                    f"({path.read_text(errors='replace').strip()}). Wait for it, or delete {path} if that "
                    "process is gone."
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            break
        try:
            yield lambda: os.utime(path)
        finally:
            path.unlink(missing_ok=True)

    def _clean_staging(self, sample_id: str) -> None:
        staging = self.root / ".staging"
        if staging.is_dir():
            for leftover in staging.glob(f"{sample_id}.*"):
                shutil.rmtree(leftover, ignore_errors=True)

    @staticmethod
    def _lock_is_stale(path: Path) -> bool:
        try:
            owner = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            return True  # unreadable or half-written lock: its writer died while creating it
        if owner.get("host") == socket.gethostname():
            try:
                os.kill(int(owner["pid"]), 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        return age > STALE_LOCK_SECONDS
