"""Visium HD Space Ranger output: square bins in ``outs/binned_outputs/square_<NNN>um/``, each a Space Ranger
folder (``spatial/tissue_positions.parquet`` with ``pxl_row_in_fullres``/``pxl_col_in_fullres``,
``spatial/scalefactors_json.json`` with ``microns_per_pixel`` and ``bin_size_um``,
``filtered_feature_bc_matrix.h5``).

One bin is one spot of the Sample. Patch geometry does not change with the bin: the local patch stays the
backbone's field (224 px at the slide's µm/px, or at ``--mpp-target``) centred on the bin, so an 8 µm bin sees
its tissue context, and neighbouring bins' patches overlap heavily. Larger bins (16 µm) cut the spot count by 4.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

from genedml.data.image import RegionReader
from genedml.data.reader import ReadOptions
from genedml.data.sample import Sample
from genedml.data.samples_table import select_ids
from genedml.data.spaceranger import read_spaceranger, spaceranger_root
from genedml.errors import InputError

BINNED = "binned_outputs"
DEFAULT_BIN_UM = 8
BIN_FOLDER = re.compile(r"^square_(\d+)um$")


def locate_run(path: str | Path) -> tuple[str, Path, Path | None] | None:
    """(run id, ``binned_outputs`` folder, the bin folder `path` names or None) for a Visium HD path.

    `path` may be the run folder (holding ``outs/``), ``outs/``, ``binned_outputs/`` or one ``square_*um/``
    folder. The run id is the name of the folder above ``outs/`` (or of the folder holding ``binned_outputs/``).
    None when `path` is not inside a Visium HD output.
    """
    path = Path(path)
    chosen = None
    if BIN_FOLDER.match(path.name) and path.parent.name == BINNED:
        binned, chosen = path.parent, path
    elif path.name == BINNED and path.is_dir():
        binned = path
    else:
        binned = next((c for c in (path / BINNED, path / "outs" / BINNED) if c.is_dir()), None)
        if binned is None:
            return None
    outs = binned.parent.resolve()
    run = outs.parent if outs.name == "outs" else outs
    return run.name, binned, chosen


def bin_sizes(binned: Path) -> dict[int, Path]:
    """{bin size in µm: folder} of the square bins Space Ranger wrote."""
    sizes = {}
    for folder in binned.iterdir():
        match = BIN_FOLDER.match(folder.name)
        if match and folder.is_dir():
            sizes[int(match.group(1))] = folder
    return dict(sorted(sizes.items()))


def read_visium_hd(
    path: str | Path,
    image: str | Path | RegionReader | None = None,
    mpp: float | None = None,
    *,
    bin_size_um: float | None = None,
    samples: Iterable[str] | str | None = None,
    samples_table=None,
) -> Sample:
    """One sample (the run) from a Visium HD output, one spot per bin of `bin_size_um` (default 8 µm).

    Pointing `path` at a ``square_016um/`` folder chooses 16 µm bins (the same for every command that reads
    the path). The image defaults to the one image file in the bin folder, ``outs/`` or the run folder.
    """
    located = locate_run(path)
    if located is None:
        raise InputError(f"{path}: not a Visium HD output (looked for {BINNED}/square_<NNN>um/, also under outs/).")
    run_id, binned, chosen = located
    select_ids([run_id], samples, str(path))
    available = bin_sizes(binned)
    size = _bin_size(bin_size_um, chosen, available, binned)
    folder = available[size] if chosen is None else chosen
    if spaceranger_root(folder) != folder:
        raise InputError(
            f"{folder}: incomplete Visium HD bin folder; expected spatial/tissue_positions.parquet and "
            "filtered_feature_bc_matrix.h5 in it."
        )
    outs = binned.parent
    image_dirs = [outs] + ([outs.parent] if outs.name == "outs" else [])
    sample = read_spaceranger(
        folder, image, mpp, sample_id=run_id, samples_table=samples_table, image_dirs=image_dirs, source="visium-hd"
    )
    sample.meta.update(bin_size_um=size, run=str(outs.parent if outs.name == "outs" else outs))
    return sample


def _bin_size(wanted: float | None, chosen: Path | None, available: dict[int, Path], binned: Path) -> int:
    if wanted is not None and not (isinstance(wanted, (int, float)) and wanted > 0 and float(wanted).is_integer()):
        raise InputError(f"bin_size_um must be a whole number of µm (Space Ranger bins: 2, 8, 16), got {wanted!r}.")
    if chosen is not None:
        size = int(BIN_FOLDER.match(chosen.name).group(1))  # type: ignore[union-attr]
        if wanted is not None and not math.isclose(wanted, size):
            raise InputError(
                f"{chosen}: the folder holds {size} µm bins but bin_size_um={wanted:g} was asked for; point at "
                f"{binned / f'square_{int(wanted):03d}um'} or at the run folder instead."
            )
        return size
    size = DEFAULT_BIN_UM if wanted is None else int(wanted)
    if size not in available:
        raise InputError(
            f"{binned}: no {size} µm bins (square_{size:03d}um/); available bin sizes: "
            f"{list(available) or 'none'} µm. Choose one with bin_size_um=..."
        )
    return size


class VisiumHDReader:
    """A Visium HD run: its folder, ``outs/``, ``binned_outputs/`` or one ``square_<NNN>um/`` bin folder."""

    name = "visium-hd"
    looks_for = "binned_outputs/square_<NNN>um/ of a Visium HD run, also under outs/ (visium-hd)"

    def detect(self, path: Path) -> bool:
        return path.is_dir() and locate_run(path) is not None

    def read(self, path: Path, options: ReadOptions) -> list[Sample]:
        return [
            read_visium_hd(
                path, options.image, options.mpp, bin_size_um=options.bin_size_um, samples=options.samples,
                samples_table=options.samples_table,
            )
        ]
