"""Feature cache: atomic samples, locks, settings checks, h5 export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from genedml.cache import FeatureCache, export_h5, settings_diff
from genedml.errors import CacheLockedError, CacheMismatchError, InputError

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
    with pytest.raises(InputError, match="complete: S1"):
        cache.read("S2")


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
