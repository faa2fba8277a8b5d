"""benchmarks/accuracy_her2st.py --folds: a subset of a split's folds, each exactly as the full split makes it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import load_benchmark

from genedml.cv import make_folds


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("accuracy_her2st")


def test_picked_folds_equal_the_full_splits_folds(bench) -> None:
    for name, split in bench.SPLITS.items():
        samples = [SimpleNamespace(sample_id=s) for s in split["samples"]]
        full = make_folds(samples, "sample", split["test_samples"])
        tests = [f["name"] for f in full]
        picked = bench.pick_folds(split, ",".join(tests[-2:]))
        assert picked == [f for f in full if f["name"] in tests[-2:]], name
    assert bench.pick_folds(bench.SPLITS["loso-C"], None) is None


def test_folds_outside_the_split_are_refused(bench) -> None:
    with pytest.raises(SystemExit, match="none of them"):
        bench.pick_folds(bench.SPLITS["C-to-B4"], "C2")


def test_each_finished_split_is_written_before_the_next_runs(bench, tmp_path, monkeypatch) -> None:
    # A whole call is hours on a CPU; one that stops must keep the splits it finished (it wrote only at the end).
    import genedml.cv

    seen: list[dict] = []

    def fake_run_cv(data, cache, out, settings, **kwargs):
        seen.append(dict(settings.head))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return {"markdown": "| genedml | 0.300 |\n", "table": {}}

    monkeypatch.setattr(genedml.cv, "run_cv", fake_run_cv)
    monkeypatch.setattr(bench, "ensure_cache", lambda *a: tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--data", str(tmp_path), "--backbones", "he-stats", "--smooth", "off", "--splits", "loso-C,C-to-B4",
                    "--head-option", "group_form=cld", "--head-option", "dim=64", "--out", str(tmp_path / "out")])
    written = __import__("json").loads((tmp_path / "out" / "results.json").read_text())
    assert [r["split"] for r in written["runs"]] == ["loso-C"]
    assert "| genedml | 0.300 |" in (tmp_path / "out" / "results.md").read_text()
    assert seen[0]["group_form"] == "cld" and seen[0]["dim"] == 64  # a bare word is a string, as in `genedml fit`


@pytest.mark.parametrize("flags, message", [
    (["--val-fraction", "1.5"], "--val-fraction must be in"),
    (["--folds", "C9"], "none of them is a fold"),
])
def test_bad_settings_are_refused_before_any_cache_is_extracted(bench, tmp_path, monkeypatch, capsys, flags, message) -> None:
    # They were checked only by run_cv, after ensure_cache had spent minutes extracting (hours with a large backbone).
    monkeypatch.setattr(bench, "ensure_cache", lambda *a, **k: pytest.fail("extraction started before the settings were checked"))
    with pytest.raises(SystemExit) as stopped:
        bench.main(["--backbones", "he-stats", "--splits", "loso-C", "--smooth", "off", "--work", str(tmp_path / "work"),
                    "--out", str(tmp_path / "out"), *flags])
    assert message in str(stopped.value) + capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
