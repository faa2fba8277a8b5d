"""Chunk-level integrity of a cached sample: the chunk files an array should have, which are stored, and a
checksum over them. `store.py` records these at commit; `verify.py` checks them."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

DIGEST = "sha256"


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
