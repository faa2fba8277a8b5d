"""Model directories appear whole or not at all, and a mixed or damaged one is refused.

The fault-injection tests fork a child that runs `fit_model` and SIGKILLs itself at the N-th write step
(before and after every file write, rename and removal), for every N; the parent then opens the directory
as `predict` does and must find the complete old model or the complete new one, never a mix.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import stat
import sys
from pathlib import Path

import numpy as np
import pytest

import genedml.atomic_dir as atomic_dir
from genedml.backbones import load_backbone
from genedml.data import read_samples
from genedml.data.synthetic import make_synthetic_dataset, write_synthetic_dataset
from genedml.errors import ConfigError, ModelDirError
from genedml.extract.runner import ExtractSettings, run_extraction
from genedml.fit import FitSettings, fit_model
from genedml.predict import Predictor, RetrievalSettings
from genedml.spots import load_spot_features
from genedml.cache import FeatureCache

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fault injection forks a child (POSIX only)")

TINY_HEAD = {"epochs": 1, "dim": 16, "groups": 2, "min_epoch_steps": 1, "batch_size": 64}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset, its cache, the spots of SYN2, and two different models fitted cleanly (old and new)."""
    root = tmp_path_factory.mktemp("modeldir")
    data = write_synthetic_dataset(root / "data", make_synthetic_dataset(n_samples=3, n_patients=2, seed=7, grid=(5, 5), n_genes=20))
    run_extraction(read_samples(data), load_backbone("he-stats"), root / "cache", ExtractSettings(patch_px=64, mpp_target=1.0))
    samples = {s.sample_id: s for s in read_samples(data)}
    feats = load_spot_features(FeatureCache(root / "cache"), ["SYN2"], with_aug=False)
    old = fit_model(root / "cache", None, root / "old", _settings(genes=10), samples=samples).model_dir
    new = fit_model(root / "cache", None, root / "new", _settings(genes=12), samples=samples).model_dir
    refs = {name: _outputs(Predictor(path), feats) for name, path in (("old", old), ("new", new))}
    return {"root": root, "samples": samples, "feats": feats, "old": old, "refs": refs}


def _settings(genes: int) -> FitSettings:
    return FitSettings(model="genedml", genes=genes, train_samples=["SYN0"], val_samples=["SYN1"], head=TINY_HEAD)


def _outputs(predictor: Predictor, feats) -> dict:
    out = predictor.predict(feats, RetrievalSettings(k=3))
    return {"genes": predictor.genes, "X": out["X"], "knn": out["knn_index"]}


def _which(predictor: Predictor, world: dict) -> str:
    """"old" or "new" when everything the predictor serves is one of the two models; fails on a mix."""
    got = _outputs(predictor, world["feats"])
    for name, ref in world["refs"].items():
        if got["genes"] == ref["genes"] and np.allclose(got["X"], ref["X"], atol=1e-5) and np.array_equal(got["knn"], ref["knn"]):
            return name
    raise AssertionError(f"a mix: {len(got['genes'])} genes, predictions match neither the old nor the new model")


# ---------------------------------------------------------------------------------------- fault injection
WRITE_STEPS = [
    (pathlib.Path, "write_text"), (os, "rename"), (os, "replace"), (shutil, "rmtree"),
    ("genedml.heads.training", "NeuralHead.save"), ("genedml.retrieval", "ReferenceBank.save"), ("genedml.retrieval", "save_index"),
    ("genedml.model_dir", "Prototypes.save"), ("genedml.fit", "_write_curve"), (atomic_dir, "normalise_modes"),
    (atomic_dir, "write_manifest"), (atomic_dir, "exchange"),
]


class Steps:
    """Wraps every write step of fit (before and after each call); while armed, calls `on_step(name)` at each."""

    def __init__(self) -> None:
        self.armed, self.seen, self.on_step = False, [], None

    def hit(self, name: str) -> None:
        if not self.armed:
            return
        self.seen.append(name)
        if self.on_step is not None:
            self.armed = False  # the check itself must not count as steps
            try:
                self.on_step(name)
            finally:
                self.armed = True

    def wrap(self, name: str, fn):
        def wrapper(*args, **kwargs):
            self.hit("before " + name)
            result = fn(*args, **kwargs)
            self.hit("after " + name)
            return result

        return wrapper


@pytest.fixture
def steps(monkeypatch):
    import importlib

    recorder = Steps()
    for owner, attr in WRITE_STEPS:
        target = importlib.import_module(owner) if isinstance(owner, str) else owner
        *path, name = attr.split(".")
        for part in path:
            target = getattr(target, part)
        monkeypatch.setattr(target, name, recorder.wrap(attr, getattr(target, name)))
    return recorder


def _fit(world: dict, out: Path, steps: Steps | None = None) -> None:
    if steps is not None:
        steps.armed = True
    try:
        fit_model(world["root"] / "cache", None, out, _settings(genes=12), samples=world["samples"], overwrite=True)
    finally:
        if steps is not None:
            steps.armed = False


def _served(out: Path, world: dict) -> str:
    """What `predict` would use now: "old", "new" or "absent" (and never a mix: `_which` fails on one)."""
    try:
        predictor = Predictor(out)
    except ModelDirError as err:
        assert "not a genedml model directory" in str(err), err
        return "absent"
    return _which(predictor, world)


def _reset(out: Path, old: Path | None) -> None:
    for path, _, _ in atomic_dir.leftovers(out):
        shutil.rmtree(path)
    shutil.rmtree(out, ignore_errors=True)
    if old is not None:
        shutil.copytree(old, out)


def _sweep(world: dict, steps: Steps, with_old: bool) -> dict[str, str]:
    """Run fit once, and at each write step check what a killed fit would leave (what a reader sees then).

    A SIGKILL runs no clean-up, so the files at the moment of a step are exactly what a kill there leaves.
    """
    out = world["root"] / ("sweep_old" if with_old else "sweep_fresh")
    _reset(out, world["old"] if with_old else None)
    served: dict[str, str] = {}
    steps.on_step = lambda name: served.setdefault(f"{len(served)}: {name}", _served(out, world))
    _fit(world, out, steps)
    assert len(served) >= 20, served  # every file written, renamed or removed is a step
    assert _served(out, world) == "new"
    return served


def test_a_fit_killed_at_any_write_step_leaves_the_old_or_the_new_model_never_a_mix(world, steps):
    served = _sweep(world, steps, with_old=True)
    states = list(served.values())
    # The old model up to the swap, the new one from the swap on: one switch, never back.
    assert set(states) == {"old", "new"} and states == sorted(states, key=["old", "new"].index), served


def test_a_first_fit_killed_at_any_write_step_leaves_no_model_or_a_complete_one(world, steps):
    states = list(_sweep(world, steps, with_old=False).values())
    assert set(states) == {"absent", "new"} and states == sorted(states, key=["absent", "new"].index)


def test_without_an_atomic_swap_the_moment_between_the_two_renames_still_serves_the_old_model(world, steps, monkeypatch):
    monkeypatch.setattr(atomic_dir, "exchange", lambda a, b: False)  # e.g. a file system without RENAME_EXCHANGE
    served = _sweep(world, steps, with_old=True)
    between = [state for name, state in served.items() if name.endswith("after rename")]
    assert between and set(served.values()) == {"old", "new"}
    states = list(served.values())
    assert states == sorted(states, key=["old", "new"].index), served


def _fork_fit_killed_at(world: dict, out: Path, steps: Steps, step: str) -> None:
    """Really SIGKILL a fit (a forked child) at the first step named `step`."""

    def die(name: str) -> None:
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: fit, killed at `step`
        try:
            steps.on_step = die
            _fit(world, out, steps)
        finally:
            os._exit(1)  # not killed: the step never came
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the fit was not killed at {step!r}"


@pytest.mark.parametrize("step", ["after NeuralHead.save", "after write_manifest", "after exchange"])
def test_a_sigkilled_fit_leaves_a_complete_model_and_the_next_fit_cleans_up(world, steps, step):
    out = world["root"] / "killed"
    _reset(out, world["old"])
    _fork_fit_killed_at(world, out, steps, step)
    assert _served(out, world) == ("new" if step == "after exchange" else "old")
    assert atomic_dir.leftovers(out)  # the dead fit's staging folder (or the old model, swapped out) is left
    _fit(world, out)
    assert _served(out, world) == "new" and not atomic_dir.leftovers(out)


def test_next_fit_restores_a_model_set_aside_by_a_killed_writer(world, steps, monkeypatch):
    monkeypatch.setattr(atomic_dir, "exchange", lambda a, b: False)
    out = world["root"] / "restore"
    _reset(out, world["old"])
    _fork_fit_killed_at(world, out, steps, "after rename")  # the old model renamed aside, the new one not in place
    assert not out.exists() and _served(out, world) == "old"  # readers find the set-aside copy
    with pytest.raises(ConfigError, match="already exists"):
        fit_model(world["root"] / "cache", None, out, _settings(genes=12), samples=world["samples"])
    assert out.is_dir() and _served(out, world) == "old" and not atomic_dir.leftovers(out)


# ------------------------------------------------------------------------------------ manifest and modes
def test_every_file_of_a_model_has_one_mode_and_is_in_the_manifest(world):
    old = world["old"]
    manifest = json.loads((old / "MANIFEST.json").read_text())
    files = sorted(p.relative_to(old).as_posix() for p in old.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "MANIFEST.json"]
    assert "head/model.safetensors" in manifest["files"] and "bank/index.faiss" in manifest["files"]
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in old.rglob("*") if p.is_file()} == {0o644 & ~umask}


@pytest.mark.parametrize("damage", ["flip a byte of the head", "an old config", "a bank from another model", "truncated index"])
def test_a_damaged_or_mixed_model_is_refused_by_predict(world, tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(world["old"], model)
    if damage == "flip a byte of the head":
        path = model / "head" / "model.safetensors"
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif damage == "an old config":
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | {"best_epoch": 7}))
    elif damage == "a bank from another model":
        (model / "bank" / "extra.safetensors").write_bytes(b"x")
    else:
        path = model / "bank" / "index.faiss"
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ModelDirError, match="does not match its MANIFEST.json"):
        Predictor(model)


def test_a_model_without_manifest_still_opens_with_a_warning(world, tmp_path, caplog):
    import logging

    model = tmp_path / "legacy"
    shutil.copytree(world["old"], model)
    (model / "MANIFEST.json").unlink()
    logger = logging.getLogger("genedml")
    logger.addHandler(caplog.handler)
    try:
        assert _which(Predictor(model), world) == "old"
    finally:
        logger.removeHandler(caplog.handler)
    assert "no MANIFEST.json" in caplog.text


# ------------------------------------------------------------------------------------- --out, checked first
def _fit_without_data(out: Path, overwrite: bool = False) -> None:
    # data=None and no samples: any check that comes after reading data would fail with another message.
    fit_model(Path("/nonexistent-cache"), None, out, _settings(genes=12), overwrite=overwrite)


def test_fit_refuses_an_existing_model_without_overwrite_before_any_work(world, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(world["old"], out)
    with pytest.raises(ConfigError, match="already exists; pass --overwrite"):
        _fit_without_data(out)


@pytest.mark.parametrize("case", ["out is a file", "parent is a file", "a folder that is not a model"])
def test_fit_refuses_a_bad_out_before_any_work(tmp_path, case):
    out = tmp_path / "model"
    if case == "out is a file":
        out.write_text("x")
        match = "is a file"
    elif case == "parent is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "model"
        match = "is a file, not a folder"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        match = "not a genedml model directory; refusing"
    with pytest.raises(ConfigError, match=match):
        _fit_without_data(out, overwrite=True)
    if case == "a folder that is not a model":
        assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_model_and_leaves_nothing_beside_it(world, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(world["old"], out)
    fit_model(world["root"] / "cache", None, out, _settings(genes=12), samples=world["samples"], overwrite=True)
    assert _which(Predictor(out), world) == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failed_fit_removes_its_staging_folder_and_keeps_the_old_model(world, tmp_path, monkeypatch):
    out = tmp_path / "model"
    shutil.copytree(world["old"], out)

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("genedml.fit._write_curve", broken)
    with pytest.raises(OSError):
        fit_model(world["root"] / "cache", None, out, _settings(genes=12), samples=world["samples"], overwrite=True)
    assert _which(Predictor(out), world) == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_model_replaced_while_it_is_read_is_refused(world, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(world["old"], out)
    predictor = Predictor(out)
    fit_model(world["root"] / "cache", None, out, _settings(genes=12), samples=world["samples"], overwrite=True)
    with pytest.raises(ModelDirError, match="was replaced"):
        predictor.bank()  # loaded lazily: its files now belong to another model
