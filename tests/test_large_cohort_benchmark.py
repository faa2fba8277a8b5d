"""benchmarks/large_cohort.py (defaults on many sections) runs end to end at a tiny size and scores every row."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "large_cohort.py"


def test_large_cohort_benchmark_fits_and_scores_each_row_on_held_out_sections(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, str(SCRIPT), "--slides", "6", "--spots-per-slide", "24", "--dim", "8", "--val", "1",
           "--test", "2", "--rows", "ridge-cv,mlp", "--opt", "dim=16", "--opt", "epochs=1", "--opt", "min_epoch_steps=2",
           "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    record = json.loads((out / "large_cohort.json").read_text())
    assert record["split"] == {"train": 3, "val": 1, "test": 2}
    assert set(record["rows"]) == {"ridge-cv", "mlp"}
    ridge = record["rows"]["ridge-cv"]["test_pcc_acg_mean"]
    assert 0.2 < ridge <= 1.0  # the synthetic features carry a learnable signal: a linear probe finds it
    assert record["rows"]["mlp"]["epochs_run"] == 1
    assert not (out / "work").exists()  # removed unless --keep-work
