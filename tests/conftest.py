"""Shared test fixtures: offline mode, real-data location, small thread counts."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TIMM_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GENEDML_SHARED_DATA", REPO.parent / "shared" / "data"))
HER2ST = SHARED_DATA / "her2st"
VISIUM = SHARED_DATA / "visium_mouse_brain_crop"
HER2ST_SPOTS = {"B4": 283, "C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}


def load_benchmark(name: str, module_name: str | None = None):
    """Import benchmarks/<name>.py as a module (benchmarks/ on sys.path for its sibling imports)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(module_name or name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def her2st_dir() -> Path:
    """The real her2st sections (../shared/data/her2st); skips the test when absent."""
    if not (HER2ST / "C3.jpg").is_file():
        pytest.skip(f"real data not found at {HER2ST} (a fresh clone has no ../shared/data)")
    return HER2ST


@pytest.fixture(scope="session")
def visium_dir() -> Path:
    """The squidpy Visium crop fixture; skips the test when absent."""
    if not (VISIUM / "test_data.h5ad").is_file():
        pytest.skip(f"real data not found at {VISIUM} (a fresh clone has no ../shared/data)")
    return VISIUM


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    torch.set_num_threads(1)  # tiny models: one thread is as fast and immune to a busy machine
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
