"""Bad input at the command line: one clear `error:` line naming what to fix, exit status 2, no traceback,
and no work done first. Every case runs `genedml.cli.main` in-process (an unexpected exception fails the test
with its traceback)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from genedml.cli import main
from genedml.data.synthetic import make_synthetic_dataset, write_synthetic_dataset


def cli(*args: str) -> tuple[int, str]:
    """(exit status, everything printed) of `genedml ARGS`, with whitespace collapsed."""
    import sys
    from io import StringIO

    out, err = StringIO(), StringIO()
    old = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        main(list(args))
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.stdout, sys.stderr = old
    return code, " ".join((out.getvalue() + err.getvalue()).split())


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """A tiny dataset, its he-stats cache, a ridge model, its predictions and a few broken files."""
    root = tmp_path_factory.mktemp("bad")
    data = write_synthetic_dataset(root / "data", make_synthetic_dataset(n_samples=3, n_patients=2, seed=11, grid=(5, 5), n_genes=20))
    paths = {"root": root, "data": data, "cache": root / "cache", "ridge": root / "ridge", "pred": root / "pred", "mixed": root / "mixed"}
    for args in (
        ["extract", str(data), "--backbone", "he-stats", "--cache", str(paths["cache"]), "--patch-px", "64", "--mpp-target", "1.0"],
        ["fit", "--cache", str(paths["cache"]), "--data", str(data), "--out", str(paths["ridge"]), "--model", "ridge", "--genes", "10"],
        ["predict", str(paths["ridge"]), "--cache", str(paths["cache"]), "--samples", "SYN2", "--out", str(paths["pred"])],
        # A second model on the same panel, its prediction put in a folder beside the first model's.
        ["fit", "--cache", str(paths["cache"]), "--data", str(data), "--out", str(root / "ridge-cv"), "--model", "ridge-cv", "--genes", "10"],
        ["predict", str(root / "ridge-cv"), "--cache", str(paths["cache"]), "--samples", "SYN1", "--out", str(paths["mixed"])],
    ):
        code, text = cli(*args)
        assert code == 0, text
    files = {
        "file": "just a file\n",
        "text.pt": "hi\n",  # torch.load raises KeyError on this one
        "notes.bin": "# my weights\nlayer1 0.5\n",
        "weights.txt": "0.1 0.2\n",
        "fake.h5ad": "not hdf5\n",
        "typo.toml": "lamda-group = 0.5\nepochs = 3\n",
        "batchsize.toml": "batchsize = 8\n",
        "table.toml": "[fitt]\nepochs = 3\n",
        "broken.toml": "epochs = = 3\n",
        "predict.toml": "[predict]\nretrieve-k = 0\n",
        "types.toml": "[fit]\nhead-option = [\"neighbor_depth=two\"]\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
        paths[name] = root / name
    good = (paths["pred"] / "SYN2.h5ad").read_bytes()
    (root / "truncated.h5ad").write_bytes(good[: len(good) // 3])
    paths["truncated.h5ad"] = root / "truncated.h5ad"
    (paths["mixed"] / "SYN2.h5ad").write_bytes(good)
    (root / "twice").mkdir()
    for name in ("SYN2.h5ad", "SYN2 (copy).h5ad"):
        (root / "twice" / name).write_bytes(good)
    paths["twice"] = root / "twice"
    (root / "folder").mkdir()
    (root / "folder" / "mine.txt").write_text("keep me")
    paths["folder"] = root / "folder"
    damaged = root / "damaged"
    shutil.copytree(paths["ridge"], damaged)
    config = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps(config | {"genes": config["genes"][::-1]}))
    paths["damaged"] = damaged
    return paths


def fill(args: tuple[str, ...], w: dict[str, Path]) -> list[str]:
    return [a.format(**{k.replace(".", "_"): v for k, v in w.items()}, new="{root}/new".format(root=w["root"])) for a in args]


EXTRACT = ("extract", "{data}", "--backbone", "he-stats", "--cache", "{root}/c_new", "--patch-px", "64")
FIT = ("fit", "--cache", "{cache}", "--data", "{data}", "--out", "{new}")
FIT_NO_DATA = ("fit", "--cache", "{cache}", "--data", "{root}/no-such-data", "--out", "{new}")  # only fails if read
CV_NO_DATA = ("cv", "{root}/no-such-data", "--cache", "{cache}", "--out", "{root}/cv_new")  # only fails if read
PREDICT = ("predict", "{ridge}", "--out", "{root}/p_new")
SLIDE = PREDICT + ("--slide", "{data}/SYN2.jpg")
EVALUATE = ("evaluate", "--data", "{data}", "--out", "{root}/e_new")

# (id, arguments, words the message must hold)
CASES = [
    # data inspect
    ("inspect: missing path", ("data", "inspect", "{root}/nope"), ["not found"]),
    ("inspect: a file of no known format", ("data", "inspect", "{file}"), ["not .h5ad", "Looked for"]),
    ("inspect: missing samples table", ("data", "inspect", "{data}", "--samples-table", "{root}/nope.csv"), ["Samples table not found"]),
    ("inspect: mpp 0", ("data", "inspect", "{data}", "--mpp", "0"), ["--mpp must be a positive number"]),
    ("inspect: mpp nan", ("data", "inspect", "{data}", "--mpp", "nan"), ["--mpp must be a positive number"]),
    ("inspect: mpp 1e-4", ("data", "inspect", "{data}", "--mpp", "1e-4"), ["outside the plausible range", "--allow-unusual-mpp"]),
    ("inspect: mpp 1e6", ("data", "inspect", "{data}", "--mpp", "1e6"), ["outside the plausible range"]),
    # extract
    ("extract: batch size 0", EXTRACT + ("--batch-size", "0"), ["--batch-size must be an integer >= 1"]),
    ("extract: unknown device", EXTRACT + ("--device", "tpu"), ["--device must be auto, cpu, cuda, cuda:N or mps", "'tpu'"]),
    ("extract: workers -1", EXTRACT + ("--workers", "-1"), ["--workers must be >= 0"]),
    ("extract: patch px 0", EXTRACT + ("--patch-px", "0"), ["--patch-px", "must be positive"]),
    ("extract: cache is a file", ("extract", "{data}", "--backbone", "he-stats", "--cache", "{file}"), ["is a file"]),
    ("extract: mpp 1e-4", EXTRACT + ("--mpp", "1e-4"), ["outside the plausible range", "--allow-unusual-mpp"]),
    ("extract: mpp 1e6", EXTRACT + ("--mpp", "1e6"), ["outside the plausible range"]),
    ("extract: mpp-target 1e5", EXTRACT + ("--mpp-target", "1e5"), ["--mpp-target", "outside the plausible range"]),
    ("extract: mpp-target 0", EXTRACT + ("--mpp-target", "0"), ["--mpp-target must be a positive number"]),
    ("extract: text file as weights (KeyError in torch)", ("extract", "{data}", "--backbone", "tiny-cnn", "--cache", "{root}/c_w", "--weights", "{text_pt}"),
     ["text.pt", "neither a safetensors file nor a PyTorch checkpoint", "text file", ".safetensors"]),
    ("extract: text file as .bin weights", ("extract", "{data}", "--backbone", "tiny-cnn", "--cache", "{root}/c_w", "--weights", "{notes_bin}"),
     ["notes.bin", "neither a safetensors file nor a PyTorch checkpoint"]),
    ("extract: weights with another suffix", ("extract", "{data}", "--backbone", "tiny-cnn", "--cache", "{root}/c_w", "--weights", "{weights_txt}"),
     ["must end with one of", ".safetensors"]),
    ("extract: missing weights file", ("extract", "{data}", "--backbone", "tiny-cnn", "--cache", "{root}/c_w", "--weights", "{root}/none.pt"),
     ["does not exist"]),
    ("extract: unknown backbone", ("extract", "{data}", "--backbone", "unii", "--cache", "{root}/c_w"), ["uni"]),
    ("extract: bad scales", EXTRACT + ("--scales", "global"), ["--scales must include 'local'"]),
    ("extract: bad neighbor mode", EXTRACT + ("--neighbor-mode", "grid"), ["--neighbor-mode"]),
    ("extract: bad token grid", EXTRACT + ("--local-tokens", "3x3"), ["--local-tokens"]),
    ("extract: bad dtype", EXTRACT + ("--dtype", "int8"), ["--dtype must be float16 or float32"]),
    ("extract: unknown config key", EXTRACT + ("--config", "{batchsize_toml}"), ["unknown key 'batchsize'", "--batch-size"]),
    ("extract: config table of another name", EXTRACT + ("--config", "{table_toml}"), ["unknown table [fitt]"]),
    ("extract: unreadable config", EXTRACT + ("--config", "{broken_toml}"), ["Cannot read config"]),
    ("extract: missing config", EXTRACT + ("--config", "{root}/none.toml"), ["Cannot read config"]),
    # fit (FIT_NO_DATA: the check must come before reading the data, which does not exist)
    ("fit: epochs 0", FIT_NO_DATA + ("--epochs", "0"), ["epochs must be an integer >= 1"]),
    ("fit: batch size 0", FIT_NO_DATA + ("--batch-size", "0"), ["batch_size must be an integer >= 1"]),
    ("fit: lr 0", FIT_NO_DATA + ("--lr", "0"), ["lr must be > 0"]),
    ("fit: genes 0", FIT_NO_DATA + ("--genes", "0"), ["--genes must be an integer >= 1"]),
    ("fit: val fraction 1.5", FIT_NO_DATA + ("--val-fraction", "1.5"), ["--val-fraction must be in [0, 1)"]),
    ("fit: unknown head", FIT_NO_DATA + ("--model", "genedmll"), ["unknown head 'genedmll'"]),
    ("fit: misspelt head option", FIT_NO_DATA + ("--head-option", "dimm=64"), ["unknown setting 'dimm'", "did you mean 'dim'"]),
    ("fit: unknown head option, nothing close", FIT_NO_DATA + ("--head-option", "nonsense=1"),
     ["unknown setting 'nonsense' for the genedml head. Valid settings: "]),
    ("fit: head option without =", FIT_NO_DATA + ("--head-option", "dim"), ["KEY=VALUE"]),
    ("fit: a flag and a head option disagree", FIT_NO_DATA + ("--lr", "0.01", "--head-option", "lr=0.001"),
     ["--lr and --head-option lr=0.001 set the same setting to different values"]),
    ("fit: head option not a number", FIT_NO_DATA + ("--head-option", "dim=abc"), ["setting dim", "takes an integer", "'abc'"]),
    ("fit: head option 1.5 for an integer", FIT_NO_DATA + ("--head-option", "dim=1.5"), ["setting dim", "takes an integer", "1.5"]),
    ("fit: head option neither true nor false", FIT_NO_DATA + ("--head-option", "instance=maybe"), ["setting instance", "true or false", "'maybe'"]),
    ("fit: head option scales as a bare word", FIT_NO_DATA + ("--head-option", "scales=local"), ["setting scales", "list of strings"]),
    ("fit: wrong type in a config file", FIT_NO_DATA + ("--config", "{types_toml}"), ["setting neighbor_depth", "takes an integer", "'two'"]),
    ("fit: flag of another head", FIT_NO_DATA + ("--model", "ridge", "--lambda-group", "0.5"), ["--lambda-group does not apply to --model ridge"]),
    ("fit: misspelt config key", FIT_NO_DATA + ("--config", "{typo_toml}"), ["unknown key 'lamda-group'", "--lambda-group"]),
    ("fit: --max-memory not a size", FIT + ("--max-memory", "lots"), ["--max-memory must be a size such as 8GB"]),
    ("fit: --max-memory 0", FIT + ("--max-memory", "0GB"), ["--max-memory must be a size"]),
    ("fit: encoder_dim not divisible by the heads", FIT + ("--head-option", "encoder_dim=30"), ["encoder_dim 30 is not divisible"]),
    ("fit: out is a file", ("fit", "--cache", "{cache}", "--data", "{root}/no-such-data", "--out", "{file}"), ["--out", "is a file"]),
    ("fit: out inside a file", ("fit", "--cache", "{cache}", "--data", "{root}/no-such-data", "--out", "{file}/model"), ["is a file, not a folder"]),
    ("fit: existing model without --overwrite", ("fit", "--cache", "{cache}", "--data", "{root}/no-such-data", "--out", "{ridge}"),
     ["already exists", "--overwrite"]),
    ("fit: --overwrite on a folder that is not a model", ("fit", "--cache", "{cache}", "--data", "{root}/no-such-data", "--out", "{folder}", "--overwrite"),
     ["not a genedml model directory", "refusing"]),
    ("fit: cache is a file", ("fit", "--cache", "{file}", "--data", "{root}/no-such-data", "--out", "{new}"), ["--cache", "is a file"]),
    ("fit: no cache there", ("fit", "--cache", "{root}/no-cache", "--data", "{root}/no-such-data", "--out", "{new}"), ["does not exist", "genedml extract"]),
    ("fit: mpp 1e-4", FIT_NO_DATA + ("--mpp", "1e-4"), ["outside the plausible range"]),
    ("fit: unknown training sample", FIT + ("--train-samples", "NOPE", "--model", "ridge"), ["NOPE", "not complete in the cache"]),
    ("fit: missing gene list", FIT_NO_DATA + ("--gene-list", "{root}/genes.txt"), ["--gene-list", "is not a file"]),
    # predict
    ("predict: retrieve-k 0", PREDICT + ("--cache", "{cache}", "--retrieve-k", "0"), ["--retrieve-k must be an integer >= 1"]),
    ("predict: unknown device", PREDICT + ("--cache", "{cache}", "--device", "gpu"), ["--device must be auto, cpu, cuda, cuda:N or mps"]),
    ("predict: --device without --slide", PREDICT + ("--cache", "{cache}", "--device", "cpu"), ["--device applies only to predict --slide"]),
    ("predict: retrieve-k -3", PREDICT + ("--cache", "{cache}", "--retrieve-k", "-3"), ["--retrieve-k must be an integer >= 1"]),
    ("predict: retrieve-k 0 from a config", PREDICT + ("--cache", "{cache}", "--config", "{predict_toml}"), ["--retrieve-k must be an integer >= 1"]),
    ("predict: blend without retrieve-k", PREDICT + ("--cache", "{cache}", "--blend", "0.3"), ["--blend applies only to retrieval", "--retrieve-k"]),
    ("predict: weighting and tau without retrieve-k", PREDICT + ("--cache", "{cache}", "--weighting", "softmax", "--tau", "0.1"),
     ["--weighting, --tau apply only to retrieval"]),
    ("predict: tau without softmax", PREDICT + ("--cache", "{cache}", "--retrieve-k", "3", "--tau", "0.1"), ["--tau applies only to --weighting softmax"]),
    ("cv: blend without retrieve-k", CV_NO_DATA + ("--blend", "0.5"), ["--blend applies only to retrieval"]),
    ("predict: blend 2", PREDICT + ("--cache", "{cache}", "--retrieve-k", "3", "--blend", "2"), ["--blend must be in [0, 1]"]),
    ("predict: bad weighting", PREDICT + ("--cache", "{cache}", "--retrieve-k", "3", "--weighting", "gauss"), ["--weighting must be"]),
    ("predict: retrieval without a bank", PREDICT + ("--cache", "{cache}", "--retrieve-k", "3"), ["needs a reference bank", "ridge"]),
    ("predict: --slide with --cache", SLIDE + ("--mpp", "1.0", "--cache", "{cache}"), ["drop --cache"]),
    ("predict: --slide gene not in the panel", SLIDE + ("--mpp", "1.0", "--genes", "NOPE"), ["NOPE", "not in the model's panel"]),
    ("predict: --slide without --mpp", SLIDE, ["--mpp", "is required"]),
    ("predict: --slide mpp 1e-4", SLIDE + ("--mpp", "1e-4"), ["outside the plausible range", "--allow-unusual-mpp"]),
    ("predict: --slide mpp 1e6", SLIDE + ("--mpp", "1e6"), ["outside the plausible range"]),
    ("predict: --slide pitch 0", SLIDE + ("--mpp", "1.0", "--pitch-um", "0"), ["--pitch-um must be > 0"]),
    ("predict: --slide is missing", PREDICT + ("--slide", "{root}/none.jpg", "--mpp", "1.0"), ["is not a file"]),
    ("predict: slide-only flags without --slide", PREDICT + ("--cache", "{cache}", "--genes", "A", "--mpp", "1"), ["--mpp, --genes apply only to predict --slide"]),
    ("predict: an unknown sample after a known one", PREDICT + ("--cache", "{cache}", "--samples", "SYN0,NOPE"), ["NOPE", "Not complete in cache"]),
    ("predict: a sample twice", PREDICT + ("--cache", "{cache}", "--samples", "SYN0,SYN0"), ["--samples lists SYN0 more than once"]),
    ("predict: --samples names nothing (an unset shell variable)", PREDICT + ("--cache", "{cache}", "--samples", ""), ["--samples '' names nothing"]),
    ("predict: neither cache nor slide", PREDICT, ["needs --cache", "--slide"]),
    ("predict: cache is a file", PREDICT + ("--cache", "{file}"), ["--cache", "is a file"]),
    ("predict: out is a file", ("predict", "{ridge}", "--cache", "{cache}", "--out", "{file}"), ["--out", "is a file"]),
    ("predict: not a model directory", ("predict", "{root}/none", "--cache", "{cache}", "--out", "{root}/p_new"), ["not a genedml model directory"]),
    ("predict: a damaged model", ("predict", "{damaged}", "--cache", "{cache}", "--out", "{root}/p_new"), ["does not match its MANIFEST.json", "config.json changed"]),
    # evaluate
    ("evaluate: truncated predictions", ("evaluate", "{truncated_h5ad}") + EVALUATE[1:], ["cannot read prediction file", "truncated.h5ad", "truncated"]),
    ("evaluate: a text file as predictions", ("evaluate", "{fake_h5ad}") + EVALUATE[1:], ["cannot read prediction file", "fake.h5ad"]),
    ("evaluate: one sample predicted twice", ("evaluate", "{twice}") + EVALUATE[1:], ["both hold predictions for sample 'SYN2'"]),
    ("evaluate: two models' predictions in one folder", ("evaluate", "{mixed}") + EVALUATE[1:], ["come from another model", "its own folder"]),
    ("evaluate: no predictions", ("evaluate", "{root}/none") + EVALUATE[1:], ["No prediction .h5ad"]),
    ("evaluate: out is a file", ("evaluate", "{pred}", "--data", "{data}", "--out", "{file}"), ["--out", "is a file"]),
    ("evaluate: mpp 1e6", ("evaluate", "{pred}") + EVALUATE[1:] + ("--mpp", "1e6"), ["outside the plausible range"]),
    ("evaluate: not a model directory", ("evaluate", "{pred}") + EVALUATE[1:] + ("--model", "{folder}"), ["not a genedml model directory"]),
    ("evaluate: a damaged model", ("evaluate", "{pred}") + EVALUATE[1:] + ("--model", "{damaged}"), ["does not match its MANIFEST.json"]),
    # cv
    ("cv: seeds not integers", CV_NO_DATA + ("--seeds", "2021,abc"), ["--seeds takes comma-separated integers", "'2021,abc'"]),
    ("cv: unknown ablation", CV_NO_DATA + ("--ablation", "no-groups"), ["Unknown --ablation 'no-groups'", "no-group"]),
    ("cv: unknown --by", CV_NO_DATA + ("--by", "slide"), ["--by must be 'patient' or 'sample'", "'slide'"]),
    ("cv: a flag and a head option disagree", CV_NO_DATA + ("--batch-size", "64", "--head-option", "batch_size=128"),
     ["--batch-size and --head-option batch_size=128 set the same setting"]),
    ("cv: head option of the wrong type", CV_NO_DATA + ("--head-option", "tau=warm"), ["setting tau", "takes a number", "'warm'"]),
    ("cv: retrieve-k beyond every fold's bank", ("cv", "{data}", "--cache", "{cache}", "--out", "{root}/cv_new", "--model", "genedml",
                                                "--retrieve-k", "1000"), ["--retrieve-k 1000 exceeds the reference bank", "training spots"]),
    ("cv: genes 0", CV_NO_DATA + ("--genes", "0"), ["--genes must be an integer >= 1"]),
    ("fit: unknown --log", FIT_NO_DATA + ("--log", "ln"), ["--log must be one of log1p, log10", "'ln'"]),
    ("fit: a training sample twice", FIT_NO_DATA + ("--train-samples", "SYN0,SYN0,SYN1"), ["--train-samples lists SYN0 more than once"]),
    ("fit: --train-samples names nothing", FIT_NO_DATA + ("--train-samples", " , "), ["--train-samples ' , ' names nothing"]),
    ("fit: train and validation overlap", FIT_NO_DATA + ("--train-samples", "SYN0,SYN1", "--val-samples", "SYN1,SYN2"),
     ["SYN1 in both --train-samples and --val-samples"]),
    ("cv: a seed twice", CV_NO_DATA + ("--seeds", "7,7"), ["--seeds lists 7 more than once"]),
    ("cv: a test sample twice", CV_NO_DATA + ("--test-samples", "SYN0,SYN0"), ["--test-samples lists SYN0 more than once"]),
    # export-h5
    ("export-h5: no cache there", ("export-h5", "{root}/no-cache", "{root}/h5"), ["does not exist"]),
    ("export-h5: cache is a file", ("export-h5", "{file}", "{root}/h5"), ["is a file"]),
    ("export-h5: out is a file", ("export-h5", "{cache}", "{file}"), ["OUT_DIR", "is a file"]),
    ("export-h5: unknown sample", ("export-h5", "{cache}", "{root}/h5", "--samples", "NOPE"), ["NOPE", "Not complete"]),
    ("export-h5: a sample twice", ("export-h5", "{cache}", "{root}/h5", "--samples", "SYN0,SYN0"), ["--samples lists SYN0 more than once"]),
]


def test_the_suite_is_broad():
    commands = {args[0] if args[0] != "data" else "data inspect" for _, args, _ in CASES}
    assert len(CASES) >= 40 and commands == {"data inspect", "extract", "fit", "predict", "evaluate", "cv", "export-h5"}


@pytest.mark.parametrize("case, args, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(w, case, args, words):
    before = sorted(p.name for p in w["root"].iterdir())
    code, text = cli(*fill(args, w))
    assert code == 2, text
    assert "Traceback" not in text and "error" in text.lower(), text
    for word in words:
        assert word in text, f"{word!r} not in: {text}"
    assert "weights_only" not in text  # torch's unsafe advice is never passed on
    assert sorted(p.name for p in w["root"].iterdir()) == before, "the command wrote something before failing"


def test_predict_slide_checks_genes_before_reading_the_slide(w, monkeypatch):
    import genedml.slide

    def no_reading(*args, **kwargs):
        raise AssertionError("the slide was opened before the genes were checked")

    monkeypatch.setattr(genedml.slide, "open_image", no_reading)
    code, text = cli(*fill(SLIDE + ("--mpp", "1.0", "--genes", "NOPE"), w))
    assert code == 2 and "not in the model's panel" in text


def test_unusual_mpp_is_accepted_with_the_override(w):
    code, text = cli("data", "inspect", str(w["data"]), "--mpp", "30", "--allow-unusual-mpp")
    assert code == 0, text
    assert "30.0000" in text


def test_an_image_smaller_than_one_patch_is_a_warning_not_an_error(w, tmp_path):
    # At 0.05 µm/px, a 64 px patch at 1 µm/px spans 1280 px: more than the 500 px synthetic image.
    code, text = cli("extract", str(w["data"]), "--backbone", "he-stats", "--cache", str(tmp_path / "c"), "--patch-px", "64",
                     "--mpp-target", "1.0", "--mpp", "0.05", "--samples", "SYN0", "--scales", "local")
    assert code == 0, text
    assert "smaller than one patch" in text and "padded with white" in text


def test_cv_resume_with_other_settings_is_one_clear_error(w, tmp_path):
    args = ("cv", str(w["data"]), "--cache", str(w["cache"]), "--out", str(tmp_path / "cv"), "--model", "ridge", "--by", "sample")
    code, text = cli(*args, "--genes", "10")
    assert code == 0, text
    runs = (tmp_path / "cv" / "cv_runs.json").read_text()
    code, text = cli(*args, "--genes", "12", "--resume")
    assert code == 2 and "Traceback" not in text, text
    assert "--resume" in text and "settings.genes" in text and "choose another --out" in text, text
    assert (tmp_path / "cv" / "cv_runs.json").read_text() == runs  # the finished runs are kept as they were
    code, text = cli(*args, "--genes", "10", "--resume")
    assert code == 0 and "| ridge |" in text, text
