"""Feature cache: atomic samples, locks, settings checks, h5 export."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from genedml.cache import FeatureCache, export_h5, settings_diff
from genedml.errors import CacheLockedError, CacheMismatchError, GenedmlError, InputError

SETTINGS = {"backbone": "tiny-vit", "weights": "random-init", "patch_px": 224, "scales": ["local"], "versions": {"torch": "x"}}


def _write(cache: FeatureCache, sample_id: str, n: int = 5) -> None:
    with cache.writing(sample_id) as w:
        w.write("local", np.arange(n * 4, dtype=np.float16).reshape(n, 1, 4))
        w.write("barcodes", np.array([f"b{i}" for i in range(n)]))
        w.write("centers", np.zeros((n, 2)))
        w.attrs(fov_px=10, mpp=1.0)


def test_sample_becomes_visible_only_when_complete(tmp_path):
    cache = FeatureCache(tmp_path / "c", SETTINGS)
    with pytest.raises(RuntimeError):
        with cache.writing("S1") as w:
            w.write("local", np.zeros((3, 1, 4), dtype=np.float16))
            assert cache.samples() == []  # staged, not visible
            raise RuntimeError("killed mid-write")
    assert cache.samples() == [] and not (tmp_path / "c" / "S1").exists()
    _write(cache, "S1")
    assert cache.samples() == ["S1"]
    got = cache.read("S1")
    assert got.barcodes.tolist() == [f"b{i}" for i in range(5)]
    assert got.local.dtype == np.float16 and got.local.shape == (5, 1, 4)


def test_store_refuses_other_settings_and_names_the_difference(tmp_path):
    FeatureCache(tmp_path / "c", SETTINGS)
    other = {**SETTINGS, "backbone": "tiny-cnn"}
    with pytest.raises(CacheMismatchError, match="backbone: cache has 'tiny-vit'"):
        FeatureCache(tmp_path / "c", other)
    # informational keys (versions, creation time) never block reuse
    FeatureCache(tmp_path / "c", {**SETTINGS, "versions": {"torch": "y"}, "created": "now"})
    assert settings_diff({"a": (1, 2)}, {"a": [1, 2]}) == []


def test_reading_a_missing_cache_or_sample_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="Run `genedml extract` first"):
        FeatureCache(tmp_path / "nothing")
    cache = FeatureCache(tmp_path / "c", SETTINGS)
    _write(cache, "S1")
    # Every reader refuses with the one message `require` gives for a list of samples.
    for read in (cache.read, cache.sample_attrs, cache.array_shapes):
        with pytest.raises(InputError, match=r"Not complete in cache .*: S2 \(complete: S1\)"):
            read("S2")


def test_live_lock_blocks_and_dead_lock_is_taken_over(tmp_path):
    cache = FeatureCache(tmp_path / "c", SETTINGS)
    with cache.lock("S1"):
        with pytest.raises(CacheLockedError, match="being written by another process"):
            with cache.lock("S1"):
                pass
    # A lock left by a process that no longer exists (SIGKILLed writer) is stale.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / "c" / ".locks" / "S1.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    (tmp_path / "c" / ".staging" / f"S1.{int(dead.stdout)}").mkdir(parents=True)
    _write(cache, "S1")
    assert cache.samples() == ["S1"]
    assert not list((tmp_path / "c" / ".staging").glob("S1.*"))


def test_export_h5_has_trident_layout(tmp_path):
    cache = FeatureCache(tmp_path / "c", SETTINGS)
    with cache.writing("S1") as w:
        w.write("local", np.ones((2, 1, 4), dtype=np.float16))
        w.write("barcodes", np.array(["a", "b"]))
        w.write("centers", np.array([[20.0, 30.0], [40.0, 50.0]]))
        w.attrs(fov_px=10, mpp=1.0)
    (path,) = export_h5(cache, tmp_path / "h5")
    with h5py.File(path) as fh:
        assert fh["features"].shape == (2, 4)
        assert fh["coords"][:].tolist() == [[15, 25], [35, 45]]  # top-left corners
        assert [b.decode() for b in fh["barcodes"][:]] == ["a", "b"]
        assert fh.attrs["weights"] == "random-init"


# ------------------------------------------------------------------------------------------ locks
def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)


def test_a_just_created_empty_lock_is_live_and_an_old_one_stale(tmp_path):
    cache = FeatureCache(tmp_path / "c", SETTINGS)
    lock = tmp_path / "c" / ".locks" / "S1.lock"
    lock.parent.mkdir(parents=True)
    lock.write_bytes(b"")  # another writer has created its lock but not yet written who it is
    with pytest.raises(CacheLockedError, match="being written by another process"):
        with cache.lock("S1"):
            pytest.fail("proceeded past a lock another writer is creating")
    old = time.time() - 120
    os.utime(lock, (old, old))  # a writer that died between creating and writing its lock
    _write(cache, "S1")
    assert cache.samples() == ["S1"] and not lock.exists()


def test_lock_never_proceeds_without_the_lock(tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "c", SETTINGS)
    lock = tmp_path / "c" / ".locks" / "S1.lock"
    lock.parent.mkdir(parents=True)
    stale = json.dumps({"pid": _dead_pid(), "host": socket.gethostname()})
    lock.write_text(stale)
    real_open = os.open

    def another_process_always_wins(path, flags, *args):  # every take-over is followed by someone else's O_EXCL
        if str(path) == str(lock) and flags & os.O_EXCL:
            lock.write_text(stale)
            raise FileExistsError(errno.EEXIST, "File exists", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", another_process_always_wins)
    with pytest.raises(CacheLockedError, match="could not take its lock"):
        with cache.lock("S1"):
            pytest.fail("proceeded without holding the lock")


def test_a_writer_whose_lock_was_taken_over_does_not_publish(tmp_path):
    cache = FeatureCache(tmp_path / "c", SETTINGS)
    with pytest.raises(CacheLockedError, match="took over its lock"):
        with cache.writing("S1") as w:
            w.write("local", np.ones((2, 1, 4), dtype=np.float16))
            # This writer looked dead; another process took the sample over and now holds its lock.
            (tmp_path / "c" / ".locks" / "S1.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "theirs"}))
    assert cache.samples() == []
    assert json.loads((tmp_path / "c" / ".locks" / "S1.lock").read_text())["token"] == "theirs"  # their lock stays


def _race_for_sample(root: str, rounds: int, barrier, results) -> None:
    cache = FeatureCache(root, SETTINGS)
    for i in range(rounds):
        barrier.wait()
        try:
            with cache.writing(f"R{i}") as w:
                w.write("local", np.full((3, 1, 4), os.getpid(), dtype=np.float32))
                time.sleep(0.3)  # hold the lock while the other process tries
            results.put((i, "wrote", os.getpid()))
        except CacheLockedError:
            results.put((i, "locked", os.getpid()))


def test_two_processes_racing_for_one_sample_exactly_one_writes(tmp_path):
    FeatureCache(tmp_path / "c", SETTINGS)
    ctx = multiprocessing.get_context("spawn")
    barrier, results, rounds = ctx.Barrier(2), ctx.Queue(), 3
    procs = [ctx.Process(target=_race_for_sample, args=(str(tmp_path / "c"), rounds, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    got = [results.get(timeout=5) for _ in range(2 * rounds)]
    cache = FeatureCache(tmp_path / "c")
    for i in range(rounds):
        outcome = sorted((what, pid) for j, what, pid in got if j == i)
        assert [what for what, _ in outcome] == ["locked", "wrote"], got
        assert (cache.read(f"R{i}").local == outcome[1][1]).all()  # the sample holds the winner's data
    assert not list((tmp_path / "c" / ".locks").iterdir())


# --------------------------------------------------------------------------------- orphan staging
def test_staging_left_by_dead_writers_is_removed_when_the_cache_is_opened_for_writing(tmp_path):
    FeatureCache(tmp_path / "c", SETTINGS)
    staging = tmp_path / "c" / ".staging"
    dead, alive = _dead_pid(), os.getpid()
    for name in (f"S1.{dead}", f"S1.removed.{dead}", f"A.1.{dead}", f"S2.{alive}", f"S3.{dead}", "notes.txt"):
        (staging / name).mkdir(parents=True)
    locks = tmp_path / "c" / ".locks"
    locks.mkdir()
    (locks / "S3.lock").write_text(json.dumps({"pid": 12345, "host": "other-node", "since": time.time()}))  # live elsewhere

    cache = FeatureCache(tmp_path / "c", SETTINGS)
    assert sorted(p.name for p in staging.iterdir()) == sorted([f"S2.{alive}", f"S3.{dead}", "notes.txt"])
    FeatureCache(tmp_path / "c")  # opening to read removes nothing
    (staging / f"A.1.{alive}").mkdir()  # sample "A.1" being written by a live process
    _write(cache, "A")  # cleaning sample A's leftovers must not touch sample A.1's
    assert (staging / f"A.1.{alive}").is_dir()


# ------------------------------------------------------------------------------------ disk errors
def test_full_disk_is_one_clear_error_naming_the_path_and_the_space_needed(tmp_path, monkeypatch):
    import zarr.storage._local as local

    cache = FeatureCache(tmp_path / "c", SETTINGS)
    real_put = local._put

    def full(path, value, exclusive=False):
        if "/local/c/" in str(path):  # the chunk files of the features
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", full)
    with pytest.raises(GenedmlError, match=r"Cannot write .*S1.*no space left; this array needs up to 2\.0 MB uncompressed, .* free"):
        with cache.writing("S1") as w:
            w.write("local", np.zeros((1024, 1, 512), dtype=np.float32))
    assert cache.samples() == [] and not list((tmp_path / "c" / ".staging").iterdir())


def test_read_only_cache_or_a_file_as_cache_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a cache")
    with pytest.raises(InputError, match=r"file\b.*is a file, not a directory"):
        FeatureCache(tmp_path / "file", SETTINGS)

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(GenedmlError, match=r"Cannot write .*new.*: read-only file system"):
        FeatureCache(tmp_path / "new", SETTINGS)
