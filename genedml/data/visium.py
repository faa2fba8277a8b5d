"""Visium geometry shared by the AnnData and Space Ranger readers: pixel size from the scale factors, and
which resolution (full-res, hires, lowres, HEST's downscaled_fullres) an image is, so full-res coordinates can
be scaled to it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from genedml.errors import InputError
from genedml.log import log


VISIUM_SPOT_UM = 55.0  # diameter of a Visium spot
# resolution -> (scale factor key, file-name pattern); downscaled_fullres is HEST's thumbnail
SCALE_KEYS = {
    "hires": ("tissue_hires_scalef", "tissue_hires_image"),
    "lowres": ("tissue_lowres_scalef", "tissue_lowres_image"),
    "downscaled_fullres": ("tissue_downscaled_fullres_scalef", "downscaled_fullres"),
}


def fullres_mpp(scalefactors: Mapping | None, where: str, spot_um: float = VISIUM_SPOT_UM) -> tuple[float | None, str]:
    """(µm per full-resolution pixel, where it came from), or (None, what was looked for).

    ``microns_per_pixel`` (Space Ranger 3+, Visium HD) wins; else the spot size over ``spot_diameter_fullres``,
    with the size from ``bin_size_um`` (Visium HD bins) or `spot_um` (55 µm Visium spots unless the caller
    knows the platform: 100 µm legacy ST spots in HEST files).
    """
    scalefactors = scalefactors or {}
    if scalefactors.get("microns_per_pixel") is not None:
        mpp = float(scalefactors["microns_per_pixel"])
        if not mpp > 0:
            raise InputError(f"{where}: microns_per_pixel must be positive, got {mpp}.")
        return mpp, "scalefactors microns_per_pixel"
    if "spot_diameter_fullres" not in scalefactors:
        return None, "scalefactors (microns_per_pixel or spot_diameter_fullres)"
    diameter = float(scalefactors["spot_diameter_fullres"])
    if not diameter > 0:
        raise InputError(f"{where}: spot_diameter_fullres must be positive, got {diameter}.")
    if scalefactors.get("bin_size_um") is not None:
        size, what = float(scalefactors["bin_size_um"]), "bin_size_um"
    else:
        size, what = float(spot_um), f"{spot_um:g} µm spots"
    return size / diameter, f"scalefactors spot_diameter_fullres ({what})"


def image_scale(
    image: Path | str,
    size: tuple[int, int],
    scalefactors: Mapping | None,
    known_sizes: Mapping[str, tuple[int, int]] | None = None,
    where: str = "",
) -> tuple[float, str]:
    """(factor from full-res pixels to the image's pixels, resolution name) for a Visium image.

    A Space Ranger hires/lowres PNG (or HEST's ``downscaled_fullres`` thumbnail) is recognised by its file name
    (``tissue_hires_image``…) or by its size matching an image stored in ``uns['spatial']``; anything else is
    taken to be the full-resolution image.
    """
    name = Path(str(image)).name.lower()
    for resolution, (key, pattern) in SCALE_KEYS.items():
        by_name = pattern in name
        by_size = known_sizes is not None and tuple(known_sizes.get(resolution, ())) == tuple(size)
        if by_name or by_size:
            if not scalefactors or key not in scalefactors:
                raise InputError(
                    f"{where}: {image} looks like the {resolution} image but the scale factors lack '{key}' "
                    "to map full-resolution coordinates onto it. Pass the full-resolution image instead."
                )
            factor = float(scalefactors[key])
            log.info(
                "%s: %s is the %s image; scaled full-resolution spot coordinates and pixel size by %s=%.5g",
                where, image, resolution, key, factor,
            )
            return factor, resolution
    return 1.0, "fullres"


# Spot diameters (µm) by platform, for files that give spot_diameter_fullres without saying how big a spot is.
LEGACY_ST_SPOT_UM = 100.0  # HEST writes spot_diameter_fullres for 100 µm legacy ST spots
_HD_BARCODE = re.compile(r"^s_(\d+)um_\d+_\d+(-\d+)?$")
_ST_BARCODE = re.compile(r"^\d+(\.\d+)?x\d+(\.\d+)?$")
_VISIUM_BARCODE = re.compile(r"^[ACGTN]{16}(-\d+)?$")


def platform_spot_um(technology: str, barcodes: Sequence[str] = ()) -> tuple[float, str] | None:
    """(spot or bin diameter in µm, platform) named by a technology string (HEST ``st_technology``, Space
    Ranger ``chemistry_description``), or None for platforms without spots (Xenium) or unknown strings."""
    text = technology.strip().lower()
    if "hd" in text.split() or "visium hd" in text:
        size = bin_um_from_barcodes(barcodes)
        return (size, "Visium HD") if size is not None else None
    if "visium" in text or "spatial 3'" in text or "cytassist" in text:
        return VISIUM_SPOT_UM, "Visium"
    if "spatial transcriptomics" in text or text in ("st", "legacy st", "legacy-st"):
        return LEGACY_ST_SPOT_UM, "legacy ST"
    return None


def bin_um_from_barcodes(barcodes: Sequence[str]) -> float | None:
    """The bin size of Visium HD barcodes (``s_008um_00012_00034-1`` → 8), or None."""
    match = _HD_BARCODE.match(str(barcodes[0])) if len(barcodes) else None
    return float(match.group(1)) if match else None


def platform_from_barcodes(barcodes: Sequence[str]) -> tuple[float, str] | None:
    """(spot diameter in µm, platform) guessed from the barcode pattern of the first spots, or None."""
    probe = [str(b) for b in barcodes[:50]]
    if not probe:
        return None
    if all(_HD_BARCODE.match(b) for b in probe):
        return bin_um_from_barcodes(probe), "Visium HD"  # type: ignore[return-value]
    if all(_ST_BARCODE.match(b) for b in probe):
        return LEGACY_ST_SPOT_UM, "legacy ST"
    if all(_VISIUM_BARCODE.match(b) for b in probe):
        return VISIUM_SPOT_UM, "Visium"
    return None
