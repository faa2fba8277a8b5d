"""Multi-process extraction: balanced sharding, torchrun (gloo) equals one process, kill + resume, rank failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from genedml.cache import FeatureCache
from genedml.data.synthetic import make_synthetic_sample, write_synthetic_dataset
from genedml.extract.distributed import shard_by_spots

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
# Spot counts 64 / 25 / 36: the largest sample alone on rank 0, the two others on rank 1.
GRIDS = {"S0": (8, 8), "S1": (5, 5), "S2": (6, 6)}


def _env(**extra: str) -> dict[str, str]:
    """This environment without any torchrun variables of an enclosing launcher, plus `extra`."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1", **extra}


def _dataset(root: Path, grids: dict[str, tuple[int, int]]) -> Path:
    samples = [make_synthetic_sample(sid, grid=g, seed=i + 1, n_genes=12) for i, (sid, g) in enumerate(grids.items())]
    return write_synthetic_dataset(root, samples)


def _extract_args(data: Path, cache: Path, *flags: str) -> list[str]:
    return ["-m", "genedml", "extract", str(data), "--backbone", "tiny-vit", "--random-init", "--cache", str(cache), *flags]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _mtimes(cache: Path, ids: list[str]) -> dict[str, int]:
    return {sid: (cache / sid / "zarr.json").stat().st_mtime_ns for sid in ids}


def _assert_valid(cache: Path, data: Path, ids: list[str], world_size: int) -> dict:
    """Every sample complete with the data's barcodes in order, nothing left locked or staged, manifest complete."""
    store = FeatureCache(cache)
    assert store.samples() == sorted(ids)
    from genedml.data import read_samples

    for sample in read_samples(data):
        cached = store.read(sample.sample_id)
        assert cached.barcodes.tolist() == sample.barcodes.tolist()
        assert cached.local.shape[0] == sample.n_spots and np.isfinite(cached.local.astype(np.float32)).all()
    assert not list((cache / ".locks").glob("*.lock"))
    assert not (cache / ".staging").is_dir() or not list((cache / ".staging").iterdir())
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["missing"] == [] and manifest["world_size"] == world_size
    assert sorted(manifest["samples"]) == sorted(ids)
    return manifest


# ------------------------------------------------------------------------------------------ sharding
def test_shard_by_spots_is_balanced_complete_and_deterministic():
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = rng.integers(0, 5000, size=int(rng.integers(0, 40))).tolist()
        if rng.random() < 0.3:  # heavy tails: a few huge slides among many small ones
            counts = (rng.pareto(1.0, size=len(counts)) * 300).astype(int).tolist()
        world = int(rng.integers(1, 9))
        shards = shard_by_spots(counts, world)
        assert len(shards) == world
        assert sorted(i for s in shards for i in s) == list(range(len(counts)))  # each sample exactly once
        assert all(s == sorted(s) for s in shards)  # dataset order within a rank
        loads = [sum(counts[i] for i in s) for s in shards]
        if counts:
            assert max(loads) <= max(counts) + sum(counts) / world
        assert shard_by_spots(counts, world) == shards


def test_shard_by_spots_balances_spots_not_sample_counts():
    assert shard_by_spots([64, 25, 36], 2) == [[0], [1, 2]]
    assert shard_by_spots([1000, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    assert shard_by_spots([5, 5], 4) == [[0], [1], [], []]  # more ranks than samples: some idle
    with pytest.raises(ValueError):
        shard_by_spots([1], 0)


# ------------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_two_ranks_write_the_same_cache_as_one_process(tmp_path):
    data = _dataset(tmp_path / "data", GRIDS)
    flags = ["--scales", "local,neighbor", "--neighbor-mode", "lattice", "--local-tokens", "2x2", "--batch-size", "8", "--workers", "1"]
    one = _run([sys.executable, *_extract_args(data, tmp_path / "one", *flags)])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([*TORCHRUN, *_extract_args(data, tmp_path / "two", *flags)])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "[rank 1/2]" in two.stderr  # non-zero ranks' log lines say which rank they come from
    assert two.stdout.count("extract: 3 samples extracted") + two.stderr.count("extract: 3 samples extracted") == 1  # rank 0 only

    manifest = _assert_valid(tmp_path / "two", data, list(GRIDS), world_size=2)
    assert {r["sample_id"] for r in manifest["last_run"]["reports"]} == set(GRIDS)
    assert manifest["errors"] == {}
    a, b = FeatureCache(tmp_path / "one"), FeatureCache(tmp_path / "two")
    assert a.samples() == b.samples() == sorted(GRIDS)
    for sid in GRIDS:
        x, y = a.read(sid), b.read(sid)
        assert sorted(x.arrays) == sorted(y.arrays)
        assert x.barcodes.tolist() == y.barcodes.tolist()
        for name in x.arrays:
            if x.arrays[name].dtype.kind in "fiub":  # both runs use one thread per process: bit-for-bit
                np.testing.assert_array_equal(x.arrays[name], y.arrays[name], err_msg=f"{sid}/{name}")
        assert x.local.dtype == np.float16 and np.abs(x.local.astype(np.float32)).sum() > 0
        keep = lambda attrs: {k: v for k, v in attrs.items() if k not in ("seconds", "completed")}  # noqa: E731
        assert keep(x.attrs) == keep(y.attrs)


@pytest.mark.slow
def test_killed_rank_leaves_nothing_complete_and_rerun_finishes_only_the_rest(tmp_path):
    # Exact neighbours and tiny batches make each sample take seconds: time to kill rank 1 inside S2.
    grids = {"S0": (10, 10), "S1": (5, 5), "S2": (8, 8)}  # rank 0: S0 (100 spots); rank 1: S1 then S2 (89)
    data = _dataset(tmp_path / "data", grids)
    cache = tmp_path / "cache"
    args = _extract_args(data, cache, "--neighbor-mode", "exact", "--batch-size", "2", "--workers", "0")
    proc = subprocess.Popen([*TORCHRUN, *args], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = cache / ".locks" / "S2.lock"
    deadline = time.time() + 120
    victim = None
    try:
        while time.time() < deadline and victim is None:
            if proc.poll() is not None:
                pytest.fail(f"extraction ended before a rank could be killed: {proc.stderr.read()[-3000:]}")
            staged = (cache / ".staging").is_dir() and any(p.name.startswith("S2.") for p in (cache / ".staging").iterdir())
            if (cache / "S1" / "zarr.json").exists() and staged:
                try:
                    victim = int(json.loads(lock.read_text())["pid"])  # the lock names the writing rank
                except (OSError, ValueError, KeyError):
                    pass  # lock being created: look again
            time.sleep(0.02)
        if victim is None:
            pytest.fail("rank 1 never reached its second sample")
        os.kill(victim, signal.SIGKILL)
        proc.wait(timeout=90)  # torchrun stops the surviving rank and fails
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0

    store = FeatureCache(cache)
    done = store.samples()
    assert "S1" in done and "S2" not in done  # the half-written S2 does not look complete
    assert (cache / ".staging").is_dir() and any(p.name.startswith("S2.") for p in (cache / ".staging").iterdir())
    # The surviving rank was stopped with SIGTERM and unwound: it left no lock and no staging group behind.
    assert [p.name for p in (cache / ".locks").glob("*.lock")] == ["S2.lock"]
    assert all(p.name.startswith("S2.") for p in (cache / ".staging").iterdir())
    before = _mtimes(cache, done)

    again = _run([*TORCHRUN, *args])
    assert again.returncode == 0, again.stderr[-3000:]
    assert _mtimes(cache, done) == before  # finished samples were not recomputed
    manifest = _assert_valid(cache, data, list(grids), world_size=2)
    status = {r["sample_id"]: r["status"] for r in manifest["last_run"]["reports"]}
    assert status == {sid: ("skipped" if sid in done else "extracted") for sid in grids}


@pytest.mark.slow
def test_a_failing_rank_does_not_leave_the_others_waiting(tmp_path):
    data = _dataset(tmp_path / "data", GRIDS)
    cache = tmp_path / "cache"
    # S2, which only rank 1 extracts, has a truncated image: rank 1 fails, rank 0 does not.
    image = data / "S2.jpg"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 3])
    start = time.time()
    run = _run([*TORCHRUN, *_extract_args(data, cache, "--scales", "local", "--batch-size", "8", "--workers", "0")], timeout=120)
    assert run.returncode != 0
    assert time.time() - start < 90  # not the collective timeout
    assert "extraction failed on 1 of 2 ranks" in run.stderr and "S2" in run.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    assert not manifest["complete"] and manifest["missing"] == ["S2"]
    assert "ImageError" in manifest["errors"]["1"]
    assert FeatureCache(cache).samples() == ["S0", "S1"]
