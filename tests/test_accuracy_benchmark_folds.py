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
