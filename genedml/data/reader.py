"""The contract every input format implements: a `Reader` detects its layout and reads `Sample`s.

Adding a format is one module with a reader object plus one entry in `genedml.data.read.READERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

from genedml.data.image import RegionReader
from genedml.data.sample import Sample
from genedml.errors import InputError


@dataclass(frozen=True)
class ReadOptions:
    """What a user may say about any input: which samples, pixel size, samples table, an external image, bin size."""

    samples: Iterable[str] | str | None = None
    mpp: float | None = None
    samples_table: Any = None  # path, parsed table, or None
    image: str | Path | RegionReader | None = None  # single-sample formats whose image lives elsewhere
    bin_size_um: float | None = None  # Visium HD: square bin size (None: the folder's, else 8 µm)


class Reader(Protocol):
    """One input layout: `detect` is cheap (file names only), `read` returns every selected sample."""

    name: str
    looks_for: str  # what `detect` looks for, shown when nothing is detected

    def detect(self, path: Path) -> bool: ...

    def read(self, path: Path, options: ReadOptions) -> list[Sample]: ...


def reject_image(format_name: str, path: Path, options: ReadOptions) -> None:
    """Multi-sample formats find their own images: an external image would be silently ignored."""
    if options.image is not None:
        raise InputError(f"{path}: image= (--image) applies to anndata/spaceranger/visium-hd inputs; {format_name} finds its own images.")
