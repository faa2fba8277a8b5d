"""Damaged caches are found, never read as data: lost chunks, changed chunks, old caches, `genedml cache verify`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from genedml.cache import FeatureCache
from genedml.cache.verify import NO_RECORD, check_sample, verify_cache
from genedml.errors import GenedmlError, InputError

SETTINGS = {"backbone": "tiny-vit", "weights": "random-init", "patch_px": 224, "scales": ["local"]}


def _cache(tmp_path, ids=("S1", "S2")) -> FeatureCache:
    cache = FeatureCache(tmp_path / "c", SETTINGS)
    for sample_id in ids:
        with cache.writing(sample_id) as w:
            w.write("local", np.ones((6, 1, 4), dtype=np.float16))
            w.write("barcodes", np.array([f"b{i}" for i in range(6)]))
            w.write("centers", np.zeros((6, 2)))  # all fill value before this change: no chunk was stored
            w.write("neighbor_index", np.zeros((6, 25), dtype=np.int64))
            w.attrs(fov_px=10, mpp=1.0)
    return cache


def _verify(cache, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "genedml", "cache", "verify", str(cache), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_lost_float_chunk_reads_as_missing_not_as_zeros(tmp_path):
    cache = _cache(tmp_path)
    (tmp_path / "c" / "S1" / "local" / "c" / "0" / "0" / "0").unlink()
    assert cache.samples() == ["S1", "S2"]  # still complete by its metadata...
    with pytest.raises(InputError, match=r"'S1' .* damaged: array 'local' has 24 missing values.*genedml cache verify"):
        cache.read("S1")  # ...but never read as data
    assert cache.read("S2").local.sum() == 24


def test_a_lost_integer_chunk_is_an_error_on_read(tmp_path):
    cache = _cache(tmp_path)
    (tmp_path / "c" / "S1" / "neighbor_index" / "c" / "0" / "0").unlink()
    with pytest.raises(InputError, match="array 'neighbor_index' lost 1 chunk file"):
        cache.read("S1")
    assert cache.read("S1", names=["local"]).local.shape == (6, 1, 4)


def test_commit_records_chunk_counts_and_checksums_and_deep_check_finds_changed_chunks(tmp_path):
    cache = _cache(tmp_path)
    record = cache.sample_attrs("S1")["integrity"]
    assert record["algorithm"] == "sha256"
    assert {name: r["chunks"] for name, r in record["arrays"].items()} == {"local": 1, "barcodes": 1, "centers": 1, "neighbor_index": 1}
    assert all(check.ok and not check.notes for check in verify_cache(cache, deep=True))

    chunk = tmp_path / "c" / "S2" / "centers" / "c" / "0" / "0"
    original = chunk.read_bytes()
    chunk.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one flipped bit
    assert check_sample(cache, "S2").ok  # every chunk file is there: the cheap check cannot tell
    deep = check_sample(cache, "S2", deep=True)
    assert not deep.ok and any("'centers': checksum differs" in p for p in deep.problems)


def test_verify_command_names_damaged_samples_and_exits_non_zero(tmp_path):
    cache = _cache(tmp_path)
    ok = _verify(tmp_path / "c")
    assert ok.returncode == 0, ok.stderr
    assert "2 samples ok" in ok.stdout + ok.stderr

    (tmp_path / "c" / "S2" / "barcodes" / "c" / "0").unlink()
    bad = _verify(tmp_path / "c")
    out = " ".join((bad.stdout + bad.stderr).split())
    assert bad.returncode == 1
    assert "S2: DAMAGED" in out and "'barcodes': 1 chunk file(s) missing" in out and "S1: ok" in out
    assert "--samples S2 --overwrite" in out and "Traceback" not in out
    assert cache.samples() == ["S1", "S2"]


def test_old_caches_without_checksums_are_still_checked(tmp_path):
    cache = _cache(tmp_path)
    for sample_id in ("S1", "S2"):  # as an older genedml wrote them: no integrity record
        meta = tmp_path / "c" / sample_id / "zarr.json"
        node = json.loads(meta.read_text())
        del node["attributes"]["integrity"]
        meta.write_text(json.dumps(node))
    (tmp_path / "c" / "S2" / "local" / "c" / "0" / "0" / "0").unlink()
    checks = {c.sample_id: c for c in verify_cache(cache, deep=True)}
    assert checks["S1"].ok and checks["S1"].notes == [NO_RECORD]
    assert not checks["S2"].ok and any("'local': 1 chunk file(s) missing" in p for p in checks["S2"].problems)
    out = _verify(tmp_path / "c", "--deep")
    assert out.returncode == 1 and "no checksums recorded (made by an older genedml)" in out.stdout + out.stderr


def test_non_finite_features_are_refused_before_they_are_cached(tmp_path):
    cache = FeatureCache(tmp_path / "c", SETTINGS)
    feats = np.ones((4, 1, 4), dtype=np.float16)
    feats[2, 0, 1] = np.inf  # float16 overflow
    with pytest.raises(GenedmlError, match=r"'S1': 1 non-finite values in 'local'.*--dtype float32"):
        with cache.writing("S1") as w:
            w.write("local", feats)
    assert cache.samples() == []
