"""The feature cache: one zarr v3 store per (backbone, geometry), one group per sample.

Layout on disk::

    CACHE/zarr.json                 root group; attrs["settings"] = what every sample was made with
    CACHE/<sample_id>/              one complete sample (a zarr group; attrs["complete"] = True and
                                    attrs["integrity"] = chunk-file count and sha256 per array)
    CACHE/.staging/<sample_id>.<pid>/          a sample being written (never visible as a sample)
    CACHE/.staging/<sample_id>.removed.<pid>/  a replaced sample being deleted
    CACHE/.locks/<sample_id>.lock   who is writing a sample right now (pid, host, token)

A sample is written under `.staging`, marked complete, then renamed into place with one `os.rename` by
the process that still holds its lock, so a killed writer leaves nothing that looks complete; staging
groups of writers that died are removed when the cache is next opened for writing. A lock is stale when
its pid is dead on this host, its heartbeat is older than STALE_LOCK_SECONDS (other hosts), or it stayed
unreadable for LOCK_GRACE_SECONDS; a stale lock is renamed away before it is deleted, so only one
process takes it over. Float arrays have fill value NaN and every chunk is stored, so a lost chunk file
reads as NaN: `read` refuses such a sample and `genedml cache verify` (verify.py) finds it. Settings that
change the features (backbone, weights, geometry, dtype) are compared on every open: a mismatch is an
error naming the setting. Full, read-only or forbidden directories are one clear GenedmlError.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import zarr

from genedml.cache.chunks import integrity_record, missing_chunks
from genedml.jsonio import jsonable
from genedml.errors import CacheLockedError, CacheMismatchError, GenedmlError, InputError
from genedml.log import log


FORMAT_VERSION = 1
# Settings that do not change the features: recorded, never compared.
INFORMATIONAL_KEYS = {"versions", "created", "weights_path", "format_version", "description", "precision", "note", "timm", "torch", "genedml"}
STALE_LOCK_SECONDS = 600.0  # a lock from another host whose heartbeat is older than this is taken over
LOCK_GRACE_SECONDS = 30.0  # an unreadable (just created, half-written) lock counts as stale only after this
LOCK_TRIES = 5
CHUNK_BYTES = 4 << 20
HOST = socket.gethostname()
# Store every chunk, also one equal to the fill value: a missing chunk file then always means damage.
ARRAY_CONFIG = {"write_empty_chunks": True}
# `<sample>.<pid>` (staging) or `<sample>.removed.<pid>` (trash); the shortest sample id wins, so a trash
# name is never read as the staging group of a sample called `<sample>.removed`.
STAGING_NAME = re.compile(r"^(?P<sample>.+?)\.(?P<trash>removed\.)?(?P<pid>\d+)$")
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in INFORMATIONAL_KEYS}


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


class SampleWriter:
    """Writes the arrays of one sample into its staging group; `FeatureCache.writing` commits it."""

    def __init__(self, group: zarr.Group, sample_id: str = "", heartbeat: Callable[[], None] = lambda: None) -> None:
        self.group = group
        self.sample_id = sample_id
        self.heartbeat = heartbeat
        self.abandoned = False

    def write(self, name: str, data: np.ndarray) -> None:
        data = np.asarray(data)
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            bad = data.size - int(np.count_nonzero(np.isfinite(data)))
            raise GenedmlError(
                f"Sample '{self.sample_id}': {bad} non-finite values in '{name}' before it was cached (the backbone "
                "overflowed? try --dtype float32). NaN marks lost chunks in the cache, so nothing was written."
            )
        with disk_errors(Path(str(getattr(self.group.store, "root", "."))) / name, needed=data.nbytes):
            if data.dtype.kind in "US" or data.dtype == object:
                arr = self.group.create_array(name, shape=data.shape, dtype=str, chunks=data.shape or (1,), config=ARRAY_CONFIG)
                arr[:] = data.astype(object)
                return
            fill = np.nan if data.dtype.kind == "f" else None  # a lost float chunk reads as NaN, not as zeros
            arr = self.group.create_array(
                name, shape=data.shape, dtype=data.dtype, chunks=_row_chunks(data.shape, data.dtype.itemsize),
                fill_value=fill, config=ARRAY_CONFIG,
            )
            arr[...] = data

    def attrs(self, **values: Any) -> None:
        self.group.attrs.update(jsonable(values))

    def abandon(self) -> None:
        """Discard this staging group instead of publishing it (e.g. another writer finished the sample)."""
        self.abandoned = True


class SampleLock:
    """A held sample lock: call it to refresh its heartbeat; `held()` says whether it is still ours."""

    def __init__(self, path: Path, token: str) -> None:
        self.path = path
        self.token = token

    def __call__(self) -> None:
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass  # taken over: the commit finds out and discards the sample

    def held(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, ValueError, AttributeError):
            return False


class FeatureCache:
    """A feature store at `root`; open with the settings of the run (or none, to read)."""

    def __init__(self, root: str | Path, settings: dict[str, Any] | None = None, *, create: bool = True) -> None:
        self.root = Path(root)
        check_cache_path(self.root)
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
            settings = jsonable({**settings, "format_version": FORMAT_VERSION})
            with disk_errors(self.root):
                self.root.mkdir(parents=True, exist_ok=True)
                self._create_root(settings)
            self.settings = settings
        if settings is not None:
            self._clean_orphans()

    def _create_root(self, settings: dict[str, Any]) -> None:
        # Several ranks may create the store at once: write to a temp file and rename (last one wins,
        # all write identical settings), then re-read and compare.
        tmp = self.root / f".zarr.json.{os.getpid()}.{HOST}"
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
        self.require([sample_id])
        return dict(zarr.open_group(str(self.sample_dir(sample_id)), mode="r").attrs)

    def array_shapes(self, sample_id: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Shape and dtype of every array of a complete sample, from its metadata (no chunk is read)."""
        self.require([sample_id])
        group = zarr.open_group(str(self.sample_dir(sample_id)), mode="r")
        return {key: (tuple(group[key].shape), np.dtype(group[key].dtype)) for key in group.array_keys()
                if np.dtype(group[key].dtype).kind != "T"}

    def read(self, sample_id: str, names: list[str] | None = None) -> CachedSample:
        """Load a complete sample (all arrays, or only `names`); a lost or damaged chunk is an error."""
        self.require([sample_id])
        group = zarr.open_group(str(self.sample_dir(sample_id)), mode="r")
        attrs = dict(group.attrs)
        arrays = {}
        for key in group.array_keys():
            if names is None or key in names:
                arrays[key] = self._read_array(group, sample_id, key, all_chunks_written="integrity" in attrs)
        return CachedSample(sample_id, attrs, arrays)

    def _read_array(self, group: zarr.Group, sample_id: str, name: str, all_chunks_written: bool) -> np.ndarray:
        try:
            values = np.asarray(group[name][...])
        except (RuntimeError, ValueError) as exc:  # a truncated or garbled chunk fails to decode
            raise InputError(self._damaged(sample_id, f"array '{name}' cannot be decoded ({exc})")) from exc
        if values.dtype.kind == "f":
            bad = values.size - int(np.count_nonzero(np.isfinite(values)))
            if bad:
                raise InputError(self._damaged(sample_id, f"array '{name}' has {bad} missing values (a lost chunk file reads as NaN)"))
        elif all_chunks_written:  # integers, masks and strings cannot be NaN: look for the chunk files
            missing = missing_chunks(self.sample_dir(sample_id) / name)
            if missing:
                raise InputError(self._damaged(sample_id, f"array '{name}' lost {len(missing)} chunk file(s) ({missing[0]}, ...)"))
        return values

    def _damaged(self, sample_id: str, what: str) -> str:
        return (
            f"Cached sample '{sample_id}' in {self.root} is damaged: {what}. Run `genedml cache verify {self.root}` "
            f"and re-extract it (`genedml extract DATA --cache {self.root} --samples {sample_id} --overwrite`)."
        )

    def require(self, sample_ids: Sequence[str]) -> None:
        """Refuse, before any work, a sample list naming samples this cache does not hold complete."""
        missing = [s for s in sample_ids if not self.is_complete(s)]
        if missing:
            known = ", ".join(self.samples()) or "none"
            raise InputError(f"Not complete in cache {self.root}: {', '.join(missing)} (complete: {known}).")

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
        with self.lock(sample_id) as held:
            self._clean_staging(sample_id)  # we hold the lock: any staging group of this sample is a leftover
            staging = self.root / ".staging" / f"{sample_id}.{os.getpid()}"
            with disk_errors(staging):
                staging.parent.mkdir(parents=True, exist_ok=True)
                group = zarr.open_group(str(staging), mode="w")
            writer = SampleWriter(group, sample_id, heartbeat=held)
            try:
                yield writer
                if not writer.abandoned:
                    self._commit(sample_id, staging, group, held)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, sample_id: str, staging: Path, group: zarr.Group, held: SampleLock) -> None:
        """Record chunk counts and checksums, mark complete, and rename into place if the lock is still ours."""
        with disk_errors(staging):
            group.attrs.update({
                "complete": True, "completed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "integrity": integrity_record(staging),
            })
        if not held.held():
            raise CacheLockedError(
                f"Sample '{sample_id}' in {self.root}: another process took over its lock while this one wrote it "
                "(this process looked dead or stalled); this copy was discarded."
            )
        with disk_errors(self.sample_dir(sample_id)):
            self.remove(sample_id)
            os.rename(staging, self.sample_dir(sample_id))

    @contextmanager
    def lock(self, sample_id: str) -> Iterator[SampleLock]:
        """An exclusive per-sample lock file; stale locks of dead writers are taken over.

        Yields a `SampleLock`: calling it refreshes the lock's mtime (long writers do, so a lock held by a
        live process on another host is recognisable as alive). Never proceeds without the lock: raises
        CacheLockedError when a live writer holds it or it could not be taken in LOCK_TRIES tries.
        """
        path = self.root / ".locks" / f"{sample_id}.lock"
        with disk_errors(path):
            path.parent.mkdir(parents=True, exist_ok=True)
        held = SampleLock(path, self._acquire(path, sample_id))
        try:
            yield held
        finally:
            if held.held():
                path.unlink(missing_ok=True)

    def _acquire(self, path: Path, sample_id: str) -> str:
        token = uuid.uuid4().hex
        me = {"pid": os.getpid(), "host": HOST, "since": time.time(), "token": token, "start": _process_start(os.getpid())}
        for _ in range(LOCK_TRIES):
            try:
                with disk_errors(path):
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                seen = _read_lock(path)
                if seen is None:
                    continue  # released meanwhile
                if not _lock_is_stale(*seen):
                    raise CacheLockedError(
                        f"Sample '{sample_id}' in {self.root} is being written by another process "
                        f"({seen[1].decode(errors='replace').strip() or 'lock being created'}). Wait for it, or delete "
                        f"{path} if that process is gone."
                    ) from None
                _take_over(path, seen)
                continue
            try:
                with disk_errors(path), os.fdopen(fd, "w") as fh:
                    json.dump(me, fh)
            except BaseException:
                path.unlink(missing_ok=True)
                raise
            return token
        raise CacheLockedError(
            f"Sample '{sample_id}' in {self.root}: could not take its lock {path} in {LOCK_TRIES} tries (other "
            "processes keep taking it over); run again."
        )

    def _clean_staging(self, sample_id: str) -> None:
        """Remove every staging or trash group of `sample_id` (call only while holding its lock)."""
        for entry, (owner, _, _) in _staging_entries(self.root):
            if owner == sample_id:
                shutil.rmtree(entry, ignore_errors=True)

    def _clean_orphans(self) -> None:
        """Remove staging groups whose writer is a dead process on this host and whose sample nobody locks."""
        for entry, (sample_id, pid, trash) in _staging_entries(self.root):
            if _pid_alive(pid):
                continue  # maybe a live writer here (and pid numbers of other hosts mean nothing here)
            lock = _read_lock(self.root / ".locks" / f"{sample_id}.lock")
            if not trash and lock is not None and not _lock_is_stale(*lock):
                continue  # a live writer (perhaps on another host) owns this sample
            log.info("removing %s, left by writer %d that is gone", entry, pid)
            shutil.rmtree(entry, ignore_errors=True)


def check_cache_path(root: Path) -> None:
    """A cache path must be a directory or not exist yet (checked before any work)."""
    if root.exists() and not root.is_dir():
        raise InputError(f"Feature cache path {root} is a file, not a directory: pass a directory to --cache (it is created if missing).")


@contextmanager
def disk_errors(path: Path, needed: int | None = None) -> Iterator[None]:
    """Turn a full, read-only or forbidden directory into one GenedmlError naming `path` (and the space needed)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        where = Path(exc.filename) if exc.filename else path
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            kind = "no space left" if exc.errno == errno.ENOSPC else "disk quota exceeded"
            free = _free_bytes(where)
            need = f"; this array needs up to {_size(needed)} uncompressed" if needed else ""
            have = f", {_size(free)} free there" if free is not None else ""
            msg = f"Cannot write {where}: {kind}{need}{have}. Free some space or pass another --cache directory."
        elif exc.errno == errno.EROFS:
            msg = f"Cannot write {where}: read-only file system. Pass a writable --cache directory."
        elif exc.errno == errno.ENOTDIR:
            msg = f"Cannot write {where}: a part of that path is a file, not a directory. Pass another --cache directory."
        else:
            msg = f"Cannot write {where}: permission denied. Pass a --cache directory you can write to."
        raise GenedmlError(msg) from None


def _free_bytes(path: Path) -> int | None:
    for parent in [path, *path.parents]:
        if parent.exists():
            try:
                return shutil.disk_usage(parent).free
            except OSError:
                return None
    return None


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value, unit = float(n) / 1024, "KB"
    for bigger in ("MB", "GB", "TB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


# ----------------------------------------------------------------------------- lock and staging helpers
def _staging_entries(root: Path) -> list[tuple[Path, tuple[str, int, bool]]]:
    """(path, (sample id, writer pid, is trash)) of every recognisable entry under `root/.staging`."""
    staging = root / ".staging"
    if not staging.is_dir():
        return []
    out = []
    for entry in staging.iterdir():
        match = STAGING_NAME.match(entry.name)
        if match:
            out.append((entry, (match["sample"], int(match["pid"]), bool(match["trash"]))))
    return out


def _read_lock(path: Path) -> tuple[os.stat_result, bytes] | None:
    """(stat, content) of a lock file, or None when it does not exist (any more)."""
    try:
        with open(path, "rb") as fh:
            return os.fstat(fh.fileno()), fh.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        return path.stat(), b""


def _lock_is_stale(stat: os.stat_result, content: bytes) -> bool:
    age = time.time() - stat.st_mtime
    try:
        owner = json.loads(content)
        pid = int(owner["pid"])
    except (ValueError, TypeError, KeyError):
        return age > LOCK_GRACE_SECONDS  # just created and not yet written, or its writer died while writing it
    if owner.get("host") == HOST:
        return not _pid_alive(pid, owner.get("start"))
    return age > STALE_LOCK_SECONDS


def _take_over(path: Path, seen: tuple[os.stat_result, bytes]) -> None:
    """Move a stale lock aside and delete it; of several processes doing this only one moves it."""
    grave = path.with_name(f"{path.name}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return  # another process took it over first
    now = _read_lock(grave)
    if now is not None and (now[0].st_ino, now[0].st_mtime_ns, now[1]) == (seen[0].st_ino, seen[0].st_mtime_ns, seen[1]):
        log.info("took over the stale lock %s (%s)", path, seen[1].decode(errors="replace").strip() or "empty")
        grave.unlink(missing_ok=True)
        return
    # We moved a lock that another process had just taken: give it back unless the name was taken again
    # (then the displaced writer finds at commit that the lock is no longer its own and discards its copy).
    try:
        os.link(grave, path)
    except OSError:
        pass
    grave.unlink(missing_ok=True)


def _pid_alive(pid: int, start: Any = None) -> bool:
    """Whether `pid` runs on this host (and, when `start` is given, is the process that started then)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True
    state, started = stat
    return state != "Z" and (start is None or started == start)  # a zombie has exited; a new start is pid reuse


def _process_start(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) from /proc (Linux), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None
