"""Extraction: geometry, features equal a direct forward, lattice vs exact, resume after SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from genedml.backbones import load_backbone
from genedml.cache import FeatureCache
from genedml.spots import load_spot_features
from genedml.data.synthetic import make_synthetic_sample, write_synthetic_dataset
from genedml.errors import CacheMismatchError
from genedml.extract.geometry import CENTRE_TILE, Geometry, exact_neighbor_boxes, lattice_neighbors, local_boxes
from genedml.extract.patches import dihedral_views, read_patches
from genedml.extract.runner import ExtractSettings, reports_summary, run_extraction


@pytest.fixture(scope="module")
def tiny_vit():
    return load_backbone("tiny-vit", random_init=True)


@pytest.fixture(scope="module")
def sample():
    return make_synthetic_sample("S0", grid=(6, 6), seed=1, n_genes=20)


def test_geometry_is_physical():
    assert Geometry(224, None).fov_px(0.5) == 224
    assert Geometry(224, 0.5).fov_px(0.25) == 448  # 112 µm at 0.25 µm/px
    boxes = local_boxes(np.array([[100.0, 200.0]]), 50)
    assert boxes.tolist() == [[75, 175, 50, 50]]
    nb, mask = exact_neighbor_boxes(np.array([[100.0, 200.0]]), 50, 1000, 1000)
    assert nb[0, CENTRE_TILE].tolist() == [75, 175, 50, 50]
    assert nb[0, 0].tolist() == [-25, 75, 50, 50]  # two tiles up and left
    assert mask[0].all()
    _, mask = exact_neighbor_boxes(np.array([[10.0, 10.0]]), 50, 1000, 1000)
    assert mask.reshape(5, 5)[:2].sum() == 0 and mask.reshape(5, 5)[2:, 2:].all()


def test_dihedral_views_are_the_8_symmetries():
    x = torch.arange(2 * 3 * 3 * 3, dtype=torch.uint8).reshape(2, 3, 3, 3)
    views = dihedral_views(x)
    assert views.shape == (2, 8, 3, 3, 3)
    assert torch.equal(views[:, 0], x)
    flat = {views[0, i].numpy().tobytes() for i in range(8)}
    assert len(flat) == 8


def test_cached_local_features_equal_a_direct_forward(tmp_path, tiny_vit, sample):
    settings = ExtractSettings(scales=("local",), local_tokens="2x2", dtype="float32", batch_size=16, workers=2)
    run_extraction([sample], tiny_vit, tmp_path / "c", settings)
    cached = FeatureCache(tmp_path / "c").read("S0")
    fov = settings.geometry.fov_px(sample.mpp)
    crops = read_patches(sample.image, local_boxes(sample.centers, fov), settings.patch_px)
    direct = tiny_vit.encode(crops, token_grid=2).numpy()
    assert cached.local.shape == (sample.n_spots, 5, tiny_vit.dim)
    np.testing.assert_allclose(cached.local, direct, rtol=1e-4, atol=1e-4)
    assert cached.barcodes.tolist() == sample.barcodes.tolist()
    prov = FeatureCache(tmp_path / "c").settings
    assert prov["weights"] == "random-init" and prov["backbone"] == "tiny-vit"


def test_float16_cache_within_half_precision(tmp_path, tiny_vit, sample):
    run_extraction([sample], tiny_vit, tmp_path / "c", ExtractSettings(scales=("local",)))
    cached = FeatureCache(tmp_path / "c").read("S0").local.astype(np.float32)
    fov = Geometry().fov_px(sample.mpp)
    direct = tiny_vit.encode(read_patches(sample.image, local_boxes(sample.centers, fov), 224)).numpy()
    np.testing.assert_allclose(cached, direct, rtol=2e-3, atol=2e-3)


def test_lattice_tiles_that_coincide_with_exact_tiles_have_identical_features(tmp_path, tiny_vit, sample):
    base = dict(dtype="float32", batch_size=32)
    run_extraction([sample], tiny_vit, tmp_path / "lat", ExtractSettings(neighbor_mode="lattice", **base))
    run_extraction([sample], tiny_vit, tmp_path / "ex", ExtractSettings(neighbor_mode="exact", **base))
    lat = load_spot_features(FeatureCache(tmp_path / "lat"), ["S0"])
    ex = load_spot_features(FeatureCache(tmp_path / "ex"), ["S0"])
    np.testing.assert_array_equal(lat.neighbor_mask, ex.neighbor_mask)
    fov = Geometry().fov_px(sample.mpp)
    lattice = lattice_neighbors(sample.centers, fov, sample.image.width, sample.image.height)
    exact_boxes, mask = exact_neighbor_boxes(sample.centers, fov, sample.image.width, sample.image.height)
    same = mask & np.all(lattice.boxes[np.clip(lattice.index, 0, None)] == exact_boxes, axis=-1)
    assert same[0].sum() == mask[0].sum()  # the anchor spot's tiles all coincide
    lat_tiles, ex_tiles = lat.neighbors_of(np.arange(len(lat)))[0], ex.neighbors_of(np.arange(len(ex)))[0]
    np.testing.assert_allclose(lat_tiles[same], ex_tiles[same], rtol=1e-5, atol=1e-5)
    assert not np.allclose(lat_tiles[mask & ~same], 0)  # snapped tiles hold real features


def test_store_refuses_to_be_extended_with_another_backbone(tmp_path, tiny_vit, sample):
    run_extraction([sample], tiny_vit, tmp_path / "c", ExtractSettings(scales=("local",)))
    other = load_backbone("he-stats", random_init=True)
    with pytest.raises(CacheMismatchError, match="backbone"):
        run_extraction([sample], other, tmp_path / "c", ExtractSettings(scales=("local",)))
    with pytest.raises(CacheMismatchError, match="patch_px"):
        run_extraction([sample], tiny_vit, tmp_path / "c", ExtractSettings(scales=("local",), patch_px=112))


def test_rerun_skips_complete_samples_and_detects_changed_spots(tmp_path, tiny_vit, sample):
    settings = ExtractSettings(scales=("local",))
    (first,) = run_extraction([sample], tiny_vit, tmp_path / "c", settings)
    (again,) = run_extraction([sample], tiny_vit, tmp_path / "c", settings)
    assert (first.status, again.status) == ("extracted", "skipped")
    (redo,) = run_extraction([sample], tiny_vit, tmp_path / "c", settings, overwrite=True)
    assert redo.status == "extracted"
    with pytest.raises(CacheMismatchError, match="--overwrite"):
        run_extraction([sample.subset(np.arange(sample.n_spots - 3))], tiny_vit, tmp_path / "c", settings)


def test_killed_extraction_resumes_without_recompute(tmp_path):
    small = make_synthetic_sample("A", grid=(4, 4), seed=1, n_genes=20)
    large = make_synthetic_sample("B", grid=(10, 10), seed=2, n_genes=20)
    data = write_synthetic_dataset(tmp_path / "data", [small, large])
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "genedml", "extract", str(data), "--backbone", "tiny-vit", "--random-init",
           "--cache", str(cache), "--neighbor-mode", "exact", "--batch-size", "4", "--workers", "0",
           "--samples-table", str(data / "samples.csv")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    staging = cache / ".staging"
    while time.time() < deadline:
        if (cache / "A" / "zarr.json").exists() and staging.is_dir() and any(p.name.startswith("B.") for p in staging.iterdir()):
            break
        if proc.poll() is not None:
            pytest.fail(f"extraction ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("extraction never reached the second sample")
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = FeatureCache(cache)
    assert store.samples() == ["A"]  # the half-written B does not look complete
    a_mtime = (cache / "A" / "zarr.json").stat().st_mtime_ns
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "skip A" in done.stderr or "1 skipped" in done.stdout + done.stderr
    assert (cache / "A" / "zarr.json").stat().st_mtime_ns == a_mtime  # A was not recomputed
    assert FeatureCache(cache).samples() == ["A", "B"]
    b = load_spot_features(FeatureCache(cache), ["B"])
    assert len(b) == large.n_spots and np.isfinite(b.tiles).all() and np.abs(b.local).sum() > 0
    assert not (cache / ".locks" / "B.lock").exists()


def test_a_sample_locked_by_a_live_writer_is_skipped_and_listed_not_fatal(tmp_path, tiny_vit, sample):
    other = make_synthetic_sample("S1", grid=(4, 4), seed=2, n_genes=20)
    settings = ExtractSettings(scales=("local",))
    cache = FeatureCache(tmp_path / "c", settings.cache_settings(tiny_vit.provenance()))
    with cache.lock("S0"):  # another worker of the job array is writing S0
        reports = run_extraction([sample, other], tiny_vit, tmp_path / "c", settings)
    assert [(r.sample_id, r.status) for r in reports] == [("S0", "locked"), ("S1", "extracted")]
    summary = reports_summary(reports)
    assert summary["locked"] == ["S0"] and summary["samples_extracted"] == 1 and summary["samples_skipped"] == 0
    assert FeatureCache(tmp_path / "c").samples() == ["S1"]


def test_job_array_workers_share_one_cache_and_each_sample_is_extracted_once(tmp_path):
    samples = [make_synthetic_sample(f"S{i}", grid=(6, 6), seed=i, n_genes=12) for i in range(4)]
    data = write_synthetic_dataset(tmp_path / "data", samples)
    cache = tmp_path / "cache"
    cmd = [sys.executable, "-m", "genedml", "extract", str(data), "--backbone", "tiny-vit", "--random-init",
           "--cache", str(cache), "--scales", "local", "--batch-size", "4", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    (cache / ".locks").mkdir(parents=True)
    live = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    (cache / ".locks" / "S3.lock").write_text(json.dumps(live))  # a third worker (this test) is writing S3
    workers = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [w.communicate(timeout=300) for w in workers]
    for worker, (out, err) in zip(workers, outs):
        assert worker.returncode == 0, err[-3000:]
    text = [" ".join((out + err).split()) for out, err in outs]
    extracted = [int(t.split(" samples extracted")[0].rsplit("extract: ", 1)[1]) for t in text]
    assert sum(extracted) == 3  # S0-S2 once each, between the two workers
    listed = [t.split("skipped, being written by another process: ")[1].split(" (re-run")[0].split(", ") for t in text]
    assert all("S3" in ids for ids in listed), text  # each worker ends with the samples it left to others
    assert FeatureCache(cache).samples() == ["S0", "S1", "S2"]
    assert [p.name for p in (cache / ".locks").iterdir()] == ["S3.lock"]


def test_a_complete_sample_with_a_lost_chunk_is_extracted_again(tmp_path, tiny_vit, sample, caplog):
    settings = ExtractSettings(scales=("local",))
    run_extraction([sample], tiny_vit, tmp_path / "c", settings)
    good = FeatureCache(tmp_path / "c").read("S0").local
    (tmp_path / "c" / "S0" / "barcodes" / "c" / "0").unlink()
    with caplog.at_level(logging.INFO, logger="genedml"):
        (redo,) = run_extraction([sample], tiny_vit, tmp_path / "c", settings)
    assert redo.status == "extracted"
    assert "S0 is damaged" in caplog.text and "'barcodes': 1 chunk file(s) missing" in caplog.text
    np.testing.assert_array_equal(FeatureCache(tmp_path / "c").read("S0").local, good)


def test_a_cache_path_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "features.zarr").write_text("not a cache")
    cmd = [sys.executable, "-m", "genedml", "extract", str(tmp_path / "no-data-here"), "--backbone", "tiny-vit",
           "--random-init", "--cache", str(tmp_path / "features.zarr")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    err = " ".join(out.stderr.split())
    assert out.returncode == 2 and "Traceback" not in err
    assert "features.zarr is a file, not a directory" in err  # not the missing data: checked first


@pytest.mark.realdata
def test_her2st_lattice_encodes_few_tiles_and_agrees_with_exact(tmp_path, her2st_dir):
    from genedml.data import read_samples

    (c3,) = read_samples(her2st_dir, samples=["C3"])
    backbone = load_backbone("he-stats", random_init=True)
    base = dict(dtype="float32", batch_size=64)
    (lat,) = run_extraction([c3], backbone, tmp_path / "lat", ExtractSettings(neighbor_mode="lattice", **base))
    (ex,) = run_extraction([c3], backbone, tmp_path / "ex", ExtractSettings(neighbor_mode="exact", **base))
    assert lat.tiles_per_spot < 5, lat
    assert ex.tiles_neighbor > 20 * c3.n_spots
    a = load_spot_features(FeatureCache(tmp_path / "lat"), ["C3"])
    b = load_spot_features(FeatureCache(tmp_path / "ex"), ["C3"])
    m = a.neighbor_mask
    na, nb = a.neighbors_of(np.arange(len(a)))[0][m], b.neighbors_of(np.arange(len(b)))[0][m]
    r = np.mean([np.corrcoef(na[:, j], nb[:, j])[0, 1] for j in range(a.dim) if nb[:, j].std() > 0])
    print(f"C3: lattice {lat.tiles_per_spot:.2f} vs exact {ex.tiles_per_spot:.2f} tiles/spot; mean feature correlation {r:.3f}")
    assert r > 0.7
