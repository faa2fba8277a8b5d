"""Find damaged cache samples: lost chunk files (cheap), changed chunk files or unreadable values (deep).

Every array of a sample written by this genedml stores all its chunks (none is skipped for equalling the
fill value), and the sample's attrs["integrity"] records per array the number of chunk files and a
sha256 over them. The cheap check compares the chunk files on disk with the array's chunk grid (and the
record); the deep check also recomputes the checksums and reads every value (a lost float chunk reads
as NaN). Samples made by an older genedml have no record: the chunk-grid check and the reads still run.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

if TYPE_CHECKING:
    from genedml.cache.store import FeatureCache

DIGEST = "sha256"
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


def array_metas(group_dir: Path) -> dict[str, dict[str, Any]]:
    """Zarr metadata of the arrays directly under a sample group, by name."""
    metas = {}
    for meta in sorted(group_dir.glob("*/zarr.json")):
        node = json.loads(meta.read_text())
        if node.get("node_type") == "array":
            metas[meta.parent.name] = node
    return metas


def expected_chunks(meta: dict[str, Any]) -> list[str]:
    """Keys (paths relative to the array folder) of every chunk of the array's regular chunk grid."""
    shape = meta["shape"]
    chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    grid = [math.ceil(s / c) if c else 0 for s, c in zip(shape, chunks)]
    encoding = meta.get("chunk_key_encoding", {"name": "default"})
    sep = encoding.get("configuration", {}).get("separator", "/" if encoding["name"] == "default" else ".")
    keys = []
    for index in itertools.product(*(range(n) for n in grid)):
        parts = [str(i) for i in index]
        keys.append(sep.join(["c", *parts]) if encoding["name"] == "default" else sep.join(parts or ["0"]))
    return keys


def stored_chunks(array_dir: Path) -> list[str]:
    """Keys of the chunk files present in an array folder (everything but its zarr.json), sorted."""
    return sorted(
        p.relative_to(array_dir).as_posix() for p in array_dir.rglob("*") if p.is_file() and p.name != "zarr.json"
    )


def array_digest(array_dir: Path) -> dict[str, Any]:
    """Number of chunk files and a sha256 over their keys and bytes."""
    keys = stored_chunks(array_dir)
    digest = hashlib.new(DIGEST)
    for key in keys:
        digest.update(key.encode() + b"\0")
        digest.update((array_dir / key).read_bytes())
    return {"chunks": len(keys), DIGEST: digest.hexdigest()}


def integrity_record(group_dir: Path) -> dict[str, Any]:
    """The attrs["integrity"] entry of a sample written in `group_dir`."""
    return {"algorithm": DIGEST, "arrays": {name: array_digest(group_dir / name) for name in array_metas(group_dir)}}


def missing_chunks(array_dir: Path, meta: dict[str, Any] | None = None) -> list[str]:
    """Chunk keys of the array's grid that have no file (written by this genedml: none may be missing)."""
    meta = meta if meta is not None else json.loads((array_dir / "zarr.json").read_text())
    present = set(stored_chunks(array_dir))
    return [k for k in expected_chunks(meta) if k not in present]


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
