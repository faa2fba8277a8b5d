"""benchmarks/equal_epochs.py: default and ablation compared at the earlier selected epoch, by recorded epoch number."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_benchmark as load


def write_curve(out: Path, fold: str, variant: str, seed: int, vals: list[float], best: int, first: int = 0) -> None:
    run = out / "timm_resnet18" / "smooth-off" / "loso-C" / "models" / fold / variant / f"seed{seed}"
    run.mkdir(parents=True)
    epochs = [{"epoch": first + i, "loss": 1.0, "val_pcc": v} for i, v in enumerate(vals)]
    (run / "curve.json").write_text(json.dumps({"epochs": epochs, "best_epoch": best}))


def test_compares_at_the_earlier_selected_epoch_and_pairs_only_same_fold_and_seed(tmp_path: Path) -> None:
    eq = load("equal_epochs")
    a, b = tmp_path / "a", tmp_path / "b"
    write_curve(a, "C3", "genedml", 1, [0.10, 0.20, 0.30, 0.40, 0.41], best=4)
    write_curve(a, "C3", "genedml___group", 1, [0.12, 0.18, 0.25, 0.24], best=2)  # stopped earlier
    write_curve(b, "C4", "genedml", 1, [0.30, 0.31, 0.32], best=1)
    write_curve(b, "C4", "genedml___instance", 1, [0.20, 0.25, 0.35], best=2)  # selected later than the default
    write_curve(b, "C4", "genedml___global", 2, [0.5, 0.6], best=1)  # no default for seed 2: not paired
    rows = eq.compare(eq.read_curves([a, b]))
    assert [(r["fold"], r["variant"], r["epoch"]) for r in rows] == [("C3", "genedml − group", 2), ("C4", "genedml − instance", 1)]
    assert rows[0]["val_default"] == 0.30 and rows[0]["val_ablation"] == 0.25 and rows[0]["default_minus_ablation"] == 0.05
    assert rows[1]["default_minus_ablation"] == pytest.approx(0.31 - 0.25)
    summary = eq.summarise(rows)
    assert summary["genedml − group"] == {"pairs": 1, "mean": 0.05, "sd": None, "default_ahead": 1}
    assert summary["genedml − instance"]["default_ahead"] == 1


def test_epoch_numbers_not_positions_and_a_run_given_twice_is_refused(tmp_path: Path) -> None:
    eq = load("equal_epochs")
    # a curve whose first recorded epoch is 5: epoch 6 is its second entry, not its seventh
    write_curve(tmp_path / "a", "C2", "genedml", 1, [0.1, 0.2, 0.3], best=6, first=5)
    assert eq.val_at(eq.read_curves([tmp_path / "a"])[("C2", "genedml", "seed1")], 6) == 0.2
    write_curve(tmp_path / "b", "C2", "genedml", 1, [0.1], best=0)
    with pytest.raises(SystemExit, match="pass each run once"):
        eq.read_curves([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(SystemExit, match="no epoch 9"):
        eq.val_at({"epochs": [{"epoch": 0, "val_pcc": 0.1}], "best_epoch": 0}, 9)


def test_a_broken_curve_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    eq = load("equal_epochs")
    run = tmp_path / "models" / "C2" / "genedml" / "seed1"
    run.mkdir(parents=True)
    (run / "curve.json").write_text('{"epochs": [')  # cut short
    with pytest.raises(SystemExit, match="cannot read"):
        eq.read_curves([tmp_path])
    (run / "curve.json").write_text(json.dumps({"epochs": [], "best_epoch": "3"}))
    with pytest.raises(SystemExit, match="not a training curve"):
        eq.read_curves([tmp_path])
    with pytest.raises(SystemExit, match="no models"):
        eq.read_curves([tmp_path / "missing"])


def test_other_heads_of_the_same_run_are_skipped(tmp_path: Path) -> None:
    """`accuracy_her2st.py --models ridge --ablations no-global` also fits ridge, whose curve.json has no epochs."""
    eq = load("equal_epochs")
    write_curve(tmp_path, "C2", "genedml", 1, [0.1, 0.2], best=1)
    write_curve(tmp_path, "C2", "genedml___global", 1, [0.1, 0.15], best=1)
    ridge = tmp_path / "timm_resnet18" / "smooth-off" / "loso-C" / "models" / "C2" / "ridge" / "seed1"
    ridge.mkdir(parents=True)
    (ridge / "curve.json").write_text(json.dumps({"model": "ridge", "alpha": 1.0}))
    assert sorted(eq.read_curves([tmp_path])) == [("C2", "genedml", "seed1"), ("C2", "genedml___global", "seed1")]
    assert [r["variant"] for r in eq.compare(eq.read_curves([tmp_path]))] == ["genedml − global"]
