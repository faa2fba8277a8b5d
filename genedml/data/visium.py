"""Visium geometry shared by the AnnData and Space Ranger readers: pixel size from the spot diameter, and
which resolution (full-res, hires, lowres) an image is, so full-res coordinates can be scaled to it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from genedml.errors import InputError
from genedml.log import log


VISIUM_SPOT_UM = 55.0  # diameter of a Visium spot
SCALE_KEYS = {"hires": "tissue_hires_scalef", "lowres": "tissue_lowres_scalef"}


def fullres_mpp(scalefactors: Mapping | None, where: str) -> float | None:
    """µm per full-resolution pixel = 55 µm / spot_diameter_fullres, or None when the key is absent."""
    if not scalefactors or "spot_diameter_fullres" not in scalefactors:
        return None
    diameter = float(scalefactors["spot_diameter_fullres"])
    if not diameter > 0:
        raise InputError(f"{where}: spot_diameter_fullres must be positive, got {diameter}.")
    return VISIUM_SPOT_UM / diameter


def image_scale(
    image: Path | str,
    size: tuple[int, int],
    scalefactors: Mapping | None,
    known_sizes: Mapping[str, tuple[int, int]] | None = None,
    where: str = "",
) -> tuple[float, str]:
    """(factor from full-res pixels to the image's pixels, resolution name) for a Visium image.

    A Space Ranger hires/lowres PNG is recognised by its file name (``tissue_hires_image``) or by its size
    matching an image stored in ``uns['spatial']``; anything else is taken to be the full-resolution image.
    """
    name = Path(str(image)).name.lower()
    for resolution, key in SCALE_KEYS.items():
        by_name = f"tissue_{resolution}_image" in name
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
