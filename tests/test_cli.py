"""The command line: the chain through `genedml ...`, config files, errors, the demo, slide prediction."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import typer.main

from genedml.cli import _default_map, _head_settings, app
from genedml.ablations import ABLATIONS
from genedml.data.synthetic import make_synthetic_dataset, write_synthetic_dataset


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genedml", *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    return write_synthetic_dataset(root / "data", make_synthetic_dataset(n_samples=3, n_patients=2, seed=5, grid=(7, 7), n_genes=25))


def test_version_and_help():
    out = run("--version")
    assert out.returncode == 0 and "genedml 0.9.0" in out.stdout + out.stderr
    assert "extract" in run("--help").stdout


def test_bad_input_is_one_clear_error_with_exit_2(tmp_path):
    out = run("data", "inspect", str(tmp_path))
    assert out.returncode == 2
    assert "error:" in out.stderr and "Traceback" not in out.stderr
    out = run("extract", str(tmp_path), "--backbone", "nope", "--cache", str(tmp_path / "c"))
    assert out.returncode == 2


def test_unknown_backbone_lists_known_ones(data, tmp_path):
    out = run("extract", str(data), "--backbone", "unii", "--cache", str(tmp_path / "c"))
    assert out.returncode == 2 and "uni2-h" in out.stderr and "timm:" in out.stderr


def test_missing_weights_says_where_to_put_them(data, tmp_path):
    out = run("extract", str(data), "--backbone", "uni", "--cache", str(tmp_path / "c"))
    assert out.returncode == 2
    assert "GENEDML_WEIGHTS_DIR" in out.stderr.replace("\n", "") and "--random-init" in out.stderr.replace("\n", "")


def test_config_file_supplies_flags_and_command_line_wins(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('[fit]\nlambda-group = 0.5\nepochs = 3\n')
    assert _default_map(["fit", "--config", str(cfg)]) == {"fit": {"lambda_group": 0.5, "epochs": 3}}


def test_a_repeatable_flag_written_once_in_a_config_is_a_list_of_one(tmp_path):
    # click refused `model = "ridge"` with "Value must be an iterable".
    cfg = tmp_path / "run.toml"
    cfg.write_text('[cv]\nmodel = "ridge"\nablation = ["mlp"]\nhead-option = "dim=64"\ngenes = 20\n')
    assert _default_map(["cv", "--config", str(cfg)]) == {"cv": {"model": ["ridge"], "ablation": ["mlp"], "head_option": ["dim=64"], "genes": 20}}


def test_a_list_in_a_config_for_a_comma_separated_flag_is_joined(tmp_path):
    # click passed the text "['C2', 'C3']" on as one sample id.
    cfg = tmp_path / "run.toml"
    cfg.write_text('[fit]\ntrain-samples = ["C2", "C3"]\nseed = 3\n[cv]\nseeds = [2021, 2022]\n')
    assert _default_map(["fit", "--config", str(cfg)]) == {"fit": {"train_samples": "C2,C3", "seed": 3}}
    assert _default_map(["cv", "--config", str(cfg)]) == {"cv": {"seeds": "2021,2022"}}


def test_fit_flags_left_unset_keep_the_heads_defaults_and_set_ones_win():
    assert _head_settings("genedml", {"lambda_group": None, "groups": 18}, {}).lambda_group == 0.1
    assert _head_settings("genedml", {"lambda_group": 0.8}, {}).lambda_group == 0.8
    # fit's flags at their defaults (instance and group on) leave TRIPLEX without contrastive pathways.
    triplex = _head_settings("triplex", {"instance": True, "group": True, "epochs": 200, "lr": 1e-4}, {})
    assert (triplex.instance, triplex.group) == (False, False)
    assert _head_settings("triplex", {"instance": False, "epochs": 7}, {}).epochs == 7


def test_fit_every_head_with_default_flags(data, tmp_path):
    from genedml.cli import main

    def cli(*args: str) -> int:  # in-process: one torch import for the whole test
        try:
            main([str(a) for a in args])
        except SystemExit as done:
            return int(done.code or 0)
        return 0

    cache = tmp_path / "cache"
    assert cli("extract", data, "--backbone", "he-stats", "--cache", cache, "--patch-px", "64", "--mpp-target", "1.0") == 0
    for model in ("genedml", "triplex", "bleep", "ridge", "ridge-cv"):
        short = [] if model.startswith("ridge") else ["--epochs", "1", "--head-option", "min_epoch_steps=1"]
        assert cli("fit", "--cache", cache, "--data", data, "--out", tmp_path / model, "--model", model, "--genes", "10", *short) == 0, model
        assert json.loads((tmp_path / model / "config.json").read_text())["model"] == model


def test_cv_help_names_every_ablation():
    cv = typer.main.get_command(app).commands["cv"]
    help_text = next(p.help for p in cv.params if p.name == "ablation")
    # an entry of the list, not a word in another entry's explanation ("as the authors")
    missing = [a for a in ABLATIONS if not re.search(rf"(?:: |; ){re.escape(a)} \(", help_text)]
    assert not missing


def test_cli_chain_extract_fit_predict_evaluate(data, tmp_path):
    cache, model, pred, ev = (tmp_path / n for n in ("cache", "model", "pred", "eval"))
    out = run("extract", str(data), "--backbone", "he-stats", "--cache", str(cache), "--patch-px", "112", "--mpp-target", "1.0")
    assert out.returncode == 0, out.stderr
    assert "3 samples extracted" in out.stderr + out.stdout
    cfg = tmp_path / "fit.toml"
    cfg.write_text("epochs = 5\nbatch-size = 64\ngenes = 20\n")
    out = run("fit", "--cache", str(cache), "--data", str(data), "--out", str(model), "--train-samples", "SYN0",
              "--val-samples", "SYN1", "--config", str(cfg), "--groups", "4", "--head-option", "dim=64")
    assert out.returncode == 0, out.stderr
    # stderr is a pipe, not a terminal: one complete line per epoch instead of a progress bar, no raw warnings
    assert "fit genedml epoch 5/5: loss=" in out.stderr and "val_pcc=" in out.stderr and "━" not in out.stderr
    assert "Traceback" not in out.stderr and "warnings.warn" not in out.stderr
    config = json.loads((model / "config.json").read_text())
    assert config["head_config"]["epochs"] == 5 and len(config["genes"]) == 20 and config["head_config"]["groups"] == 4
    assert config["head_config"]["dim"] == 64
    # No --lambda-group: the head's own default (0.8.0's fit passed λ = 0.8 whatever the head's default was).
    assert config["head_config"]["lambda_group"] == config["head_config"]["instance_weight"] == 0.1
    out = run("predict", str(model), "--cache", str(cache), "--samples", "SYN2", "--out", str(pred), "--retrieve-k", "5")
    assert out.returncode == 0, out.stderr
    adata = ad.read_h5ad(pred / "SYN2.h5ad")
    assert adata.obsm["knn_index"].shape[1] == 5
    out = run("evaluate", str(pred), "--data", str(data), "--out", str(ev))
    assert out.returncode == 0, out.stderr
    assert json.loads((ev / "metrics.json").read_text())["summary"]["samples"] == ["SYN2"]
    out = run("export-h5", str(cache), str(tmp_path / "h5"))
    assert out.returncode == 0 and len(list((tmp_path / "h5").glob("*.h5"))) == 3


def test_predict_on_a_slide_without_sequencing(data, tmp_path):
    cache, model = tmp_path / "cache", tmp_path / "model"
    assert run("extract", str(data), "--backbone", "he-stats", "--cache", str(cache), "--patch-px", "112", "--mpp-target", "1.0").returncode == 0
    out = run("fit", "--cache", str(cache), "--data", str(data), "--out", str(model), "--model", "ridge", "--genes", "20")
    assert out.returncode == 0, out.stderr
    genes = json.loads((model / "config.json").read_text())["genes"][:2]
    out = run("predict", str(model), "--slide", str(data / "SYN2.jpg"), "--mpp", "1.0", "--out", str(tmp_path / "slide"), "--genes", ",".join(genes))
    assert out.returncode == 0, out.stderr
    adata = ad.read_h5ad(tmp_path / "slide" / "SYN2.h5ad")
    assert adata.n_obs > 20 and adata.uns["genedml"]["model"] == "ridge"
    for gene in genes:
        assert (tmp_path / "slide" / f"SYN2_{gene}.png").is_file()
    # Virtual spots near real spots see nearly the same tissue: their predictions agree with the model's
    # predictions from the cache at the real spots.
    out = run("predict", str(model), "--cache", str(cache), "--samples", "SYN2", "--out", str(tmp_path / "real"))
    assert out.returncode == 0, out.stderr
    real = ad.read_h5ad(tmp_path / "real" / "SYN2.h5ad")
    from scipy.spatial import cKDTree

    dist, nearest = cKDTree(adata.obsm["spatial"]).query(real.obsm["spatial"])
    close = dist < 30
    assert close.sum() > 10
    r = np.corrcoef(real.X[close].ravel(), adata.X[nearest[close]].ravel())[0, 1]
    assert r > 0.5, r


@pytest.mark.slow
def test_demo_runs_end_to_end_and_beats_a_shuffled_control(tmp_path):
    from genedml.demo import run_demo

    report = run_demo(tmp_path / "demo", small=True, epochs=30)
    assert "random-init" in report
    rows = json.loads((tmp_path / "demo" / "report.json").read_text())["rows"]
    pcc = rows["genedml (regression)"]["pcc_acg"]
    # Shuffled-label control: the same predictions scored against spot-permuted truth.
    pred = ad.read_h5ad(tmp_path / "demo" / "pred_genedml" / "SYN3.h5ad")
    from genedml.data import read_samples
    from genedml.targets import targets_at
    from genedml.metrics import pearson_per_gene
    from genedml.model_dir import read_targets

    (sample,) = read_samples(tmp_path / "demo" / "data", samples=["SYN3"])
    truth = targets_at(sample, np.asarray(pred.obs_names), read_targets(tmp_path / "demo" / "model_genedml"))
    shuffled = np.nanmean(pearson_per_gene(truth[np.random.default_rng(0).permutation(len(truth))], pred.X))
    assert pcc > 0.15 and pcc > shuffled + 0.1, (pcc, shuffled)
    assert (tmp_path / "demo" / "eval_genedml" / "maps_SYN3.png").is_file()


def test_importing_the_cli_does_not_import_torch():
    # `genedml --help` and every error on a bad flag stay fast: the CLI's tables (help texts, ablations) are torch-free.
    code = "import sys, genedml.cli; print(sorted(m for m in ('torch', 'timm', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
