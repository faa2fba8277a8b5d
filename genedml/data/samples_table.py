"""Per-sample user choices shared by every reader: the samples table (patient, µm/px), the `samples` filter
and the precedence rules for patient ids and mpp."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from genedml.errors import InputError
from genedml.log import log


MPP_HINT = "Pass it with mpp=... (--mpp) or a samples table (CSV: sample_id,patient_id,mpp)."


@dataclass(frozen=True)
class SampleInfo:
    """One row of a samples table."""

    patient_id: str | None = None
    mpp: float | None = None


SamplesTable = Mapping[str, SampleInfo]


def read_samples_table(path: str | Path) -> dict[str, SampleInfo]:
    """Read a CSV ``sample_id,patient_id[,mpp]`` into {sample_id: SampleInfo}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Samples table not found: {path}.")
    table = pd.read_csv(path, dtype={"sample_id": str, "patient_id": str})
    table.columns = [str(c).strip() for c in table.columns]
    missing = {"sample_id", "patient_id"} - set(table.columns)
    if missing:
        raise InputError(
            f"Samples table {path} lacks columns {sorted(missing)}; expected a header "
            f"'sample_id,patient_id[,mpp]', got {list(table.columns)}."
        )
    for column in ("sample_id", "patient_id"):  # "C1, A" in a hand-written table must match sample "C1"
        table[column] = table[column].str.strip()
    dup = table["sample_id"][table["sample_id"].duplicated()]
    if len(dup):
        raise InputError(f"Samples table {path}: duplicate sample_id {sorted(set(dup))}.")
    mpp = pd.to_numeric(table["mpp"], errors="coerce") if "mpp" in table.columns else None
    if mpp is not None:
        bad = table.index[(table["mpp"].notna() & ~(mpp > 0))]
        if len(bad):
            raise InputError(
                f"Samples table {path}: mpp must be a positive number (µm per level-0 pixel); bad rows "
                f"{[int(i) + 2 for i in bad]} (sample_id {table.loc[bad, 'sample_id'].tolist()})."
            )
    return {
        str(row.sample_id): SampleInfo(
            patient_id=None if pd.isna(row.patient_id) else str(row.patient_id),
            mpp=None if mpp is None or pd.isna(mpp[i]) else float(mpp[i]),
        )
        for i, row in table.iterrows()
    }


def load_samples_table(table: str | Path | SamplesTable | None) -> SamplesTable:
    """Accept a path, an already parsed mapping, or None (empty table)."""
    if table is None:
        return {}
    if isinstance(table, (str, Path)):
        return read_samples_table(table)
    return table


def select_ids(known: Iterable[str], wanted: Iterable[str] | str | None, where: str) -> list[str]:
    """The ids to read, in the order found: all of `known`, or `wanted` (each of which must exist)."""
    known = list(known)
    if wanted is None:
        return known
    wanted = [wanted] if isinstance(wanted, str) else [str(w) for w in wanted]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise InputError(f"{where}: unknown sample ids {unknown}; known samples are {known}.")
    return [k for k in known if k in set(wanted)]


def resolve_patient(sample_id: str, table: SamplesTable, from_file: str | None = None) -> tuple[str, bool]:
    """(patient_id, patient_known): samples table, else the file's metadata, else the sample id itself."""
    info = table.get(sample_id)
    if info is not None and info.patient_id:
        return info.patient_id, True
    if from_file is not None and str(from_file).strip() not in ("", "nan", "None"):
        return str(from_file), True
    return sample_id, False


def resolve_mpp(
    sample_id: str,
    where: str,
    *,
    given: float | None,
    table: SamplesTable,
    from_file: float | None = None,
    how: str = "file metadata",
) -> float:
    """µm per level-0 pixel: the `mpp` argument wins, then the samples table, then the file (``how``).

    Never guesses: with none of the three, raises an InputError that says how to pass it.
    """
    info = table.get(sample_id)
    for value, source in ((given, "the mpp argument"), (info.mpp if info else None, "the samples table")):
        if value is not None:
            _check_positive(value, f"{where}: mpp from {source}")
            if from_file is not None and not math.isclose(value, from_file, rel_tol=0.05):
                log.info("%s: using mpp %.4g from %s instead of %.4g from %s", where, value, source, from_file, how)
            return float(value)
    if from_file is None:
        raise InputError(f"{where}: no pixel size (µm per level-0 pixel) found in {how}. {MPP_HINT}")
    _check_positive(from_file, f"{where}: mpp from {how}")
    return float(from_file)


def _check_positive(value: object, what: str) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise InputError(f"{what} must be a positive number (µm per level-0 pixel), got {value!r}. {MPP_HINT}")


def read_sections(
    folder: Path,
    ids: list[str],
    samples: Iterable[str] | str | None,
    mpp: float | None,
    samples_table: object,
    read_one: Callable[[Path, str, float | None, SamplesTable], Any],
    missing: str,
) -> list[Any]:
    """The chosen sections of a multi-sample folder, each read by `read_one(folder, id, mpp, table)`.

    `missing` is the error text when the folder holds no section at all.
    """
    if not ids:
        raise InputError(f"{folder}: {missing}")
    table = load_samples_table(samples_table)
    return [read_one(folder, sample_id, mpp, table) for sample_id in select_ids(ids, samples, str(folder))]
