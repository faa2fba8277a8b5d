"""Find damaged cache samples: lost chunk files (cheap), changed chunk files or unreadable values (deep).

Every array of a sample written by this genedml stores all its chunks (none is skipped for equalling the
fill value), and the sample's attrs["integrity"] records per array the number of chunk files and a
sha256 over them. The cheap check compares the chunk files on disk with the array's chunk grid (and the
record); the deep check also recomputes the checksums and reads every value (a lost float chunk reads
as NaN). Samples made by an older genedml have no record: the chunk-grid check and the reads still run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from genedml.cache.chunks import DIGEST, array_digest, array_metas, missing_chunks, stored_chunks
from genedml.cache.store import FeatureCache
NO_RECORD = "no checksums recorded (made by an older genedml)"


@dataclass
class SampleCheck:
    """What `check_sample` found: `problems` make the sample damaged, `notes` do not."""

    sample_id: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _chunk_problems(name: str, meta: dict[str, Any], array_dir: Path, recorded: dict[str, Any] | None) -> list[str]:
    missing = missing_chunks(array_dir, meta)
    if missing:
        more = ", ..." if len(missing) > 3 else ""
        return [f"array '{name}': {len(missing)} chunk file(s) missing ({', '.join(missing[:3])}{more})"]
    count = len(stored_chunks(array_dir))
    if recorded is not None and recorded.get("chunks") != count:
        return [f"array '{name}': {count} chunk files, {recorded.get('chunks')} written"]
    return []


def _value_problems(group_dir: Path, names: list[str]) -> list[str]:
    group = zarr.open_group(str(group_dir), mode="r")
    problems = []
    for name in names:
        try:
            values = np.asarray(group[name][...])
        except Exception as exc:  # noqa: BLE001 — any decoding failure of a stored chunk is damage to report
            problems.append(f"array '{name}' cannot be read ({type(exc).__name__}: {exc})")
            continue
        if values.dtype.kind == "f":
            bad = values.size - int(np.count_nonzero(np.isfinite(values)))
            if bad:
                problems.append(f"array '{name}': {bad} missing or non-finite values")
    return problems


def check_sample(cache: FeatureCache, sample_id: str, *, deep: bool = False) -> SampleCheck:
    """Check one complete sample: chunk files present (and with `deep`, checksums and values)."""
    group_dir = cache.sample_dir(sample_id)
    check = SampleCheck(sample_id)
    attrs = json.loads((group_dir / "zarr.json").read_text()).get("attributes", {})
    record = attrs.get("integrity")
    recorded = record.get("arrays", {}) if isinstance(record, dict) else None
    if recorded is None:
        check.notes.append(NO_RECORD)
    metas = array_metas(group_dir)
    for name in sorted(set(recorded or {}) - set(metas)):
        check.problems.append(f"array '{name}' is missing")
    for name, meta in metas.items():
        check.problems += _chunk_problems(name, meta, group_dir / name, (recorded or {}).get(name))
    if deep:
        for name in metas if recorded is not None else []:
            want = recorded.get(name, {}).get(DIGEST)
            if want is not None and array_digest(group_dir / name)[DIGEST] != want:
                check.problems.append(f"array '{name}': checksum differs (chunk files changed after extraction)")
        check.problems += _value_problems(group_dir, list(metas))
    return check


def verify_cache(cache: FeatureCache, *, deep: bool = False, samples: list[str] | None = None) -> list[SampleCheck]:
    """Check every complete sample of `cache` (or only `samples`)."""
    return [check_sample(cache, sample_id, deep=deep) for sample_id in (samples or cache.samples())]
