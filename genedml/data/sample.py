"""The data contract: one `Sample` per tissue section, whatever format it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from genedml.data.image import RegionReader
from genedml.errors import InputError


@dataclass
class Sample:
    """One section: spots (barcodes, level-0 centres), optional counts, and a lazy image.

    Conventions: ``centers`` are level-0 pixels with x = column, y = row (scanpy/HEST ``obsm['spatial']``);
    ``array_coords`` are integer grid positions in the same order (x = array column, y = array row);
    ``mpp`` is micrometres per level-0 pixel; ``genes`` are unique names (duplicates suffixed -1, -2 … as in
    scanpy), ``gene_ids`` the file's stable ids where it has them.
    """

    sample_id: str
    patient_id: str
    mpp: float
    barcodes: np.ndarray
    centers: np.ndarray
    image: RegionReader
    counts: sp.csr_matrix | None = None
    genes: np.ndarray | None = None
    array_coords: np.ndarray | None = None
    source: str = "unknown"
    patient_known: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    gene_ids: np.ndarray | None = None  # stable ids (e.g. Ensembl) beside `genes`, when the file has them

    def __post_init__(self) -> None:
        self.barcodes = np.asarray(self.barcodes).astype(str)
        self.centers = np.asarray(self.centers, dtype=np.float64)
        if self.counts is not None and not sp.issparse(self.counts):
            self.counts = sp.csr_matrix(np.asarray(self.counts))
        elif self.counts is not None:
            self.counts = sp.csr_matrix(self.counts)
        if self.genes is not None:
            self.genes = np.asarray(self.genes).astype(str)
        if self.gene_ids is not None:
            self.gene_ids = np.asarray(self.gene_ids).astype(str)
        if self.array_coords is not None:
            self.array_coords = np.asarray(self.array_coords, dtype=np.int64)
        self.validate()

    @property
    def n_spots(self) -> int:
        return len(self.barcodes)

    @property
    def n_genes(self) -> int:
        return 0 if self.genes is None else len(self.genes)

    def validate(self) -> None:
        """Check the contract; every message names the sample, its source and the offending rows."""
        where = f"sample '{self.sample_id}' ({self.meta.get('path', self.source)})"
        if not (isinstance(self.mpp, (int, float)) and np.isfinite(self.mpp) and self.mpp > 0):
            raise InputError(
                f"{where}: mpp (µm per level-0 pixel) must be a positive number, got {self.mpp!r}. "
                "Pass it with --mpp or a samples table (CSV: sample_id,patient_id,mpp)."
            )
        n = len(self.barcodes)
        if n == 0:
            raise InputError(f"{where}: the sample has no spots (empty spot table or no spot with counts).")
        if self.centers.shape != (n, 2):
            raise InputError(f"{where}: centers must have shape ({n}, 2), got {self.centers.shape}.")
        if not np.isfinite(self.centers).all():
            bad = np.flatnonzero(~np.isfinite(self.centers).all(axis=1))
            raise InputError(f"{where}: {len(bad)} spot centres are NaN/inf: {self.barcodes[bad[:10]].tolist()}.")
        uniq, counts = np.unique(self.barcodes, return_counts=True)
        if (counts > 1).any():
            dup = uniq[counts > 1]
            raise InputError(f"{where}: {len(dup)} duplicate barcodes, e.g. {dup[:10].tolist()}.")
        w, h = self.image.width, self.image.height
        outside = (
            (self.centers[:, 0] < 0) | (self.centers[:, 0] >= w) | (self.centers[:, 1] < 0) | (self.centers[:, 1] >= h)
        )
        if outside.any():
            idx = np.flatnonzero(outside)
            raise InputError(
                f"{where}: {len(idx)} of {n} spot centres fall outside the {w}x{h} image "
                f"(e.g. {self.barcodes[idx[:5]].tolist()} at {self.centers[idx[:5]].round(1).tolist()}). "
                "Are the coordinates for another image resolution (check the scale factor)?"
            )
        if self.array_coords is not None and self.array_coords.shape != (n, 2):
            raise InputError(f"{where}: array_coords must have shape ({n}, 2), got {self.array_coords.shape}.")
        if self.gene_ids is not None and (self.genes is None or len(self.gene_ids) != len(self.genes)):
            raise InputError(f"{where}: {len(self.gene_ids)} gene ids for {self.n_genes} genes.")
        if self.counts is not None:
            if self.genes is None or self.counts.shape != (n, len(self.genes)):
                raise InputError(
                    f"{where}: counts shape {self.counts.shape} does not match {n} spots x "
                    f"{0 if self.genes is None else len(self.genes)} genes."
                )
            data = self.counts.data
            if not np.isfinite(data).all():
                rows = np.unique(self.counts.tocoo().row[~np.isfinite(self.counts.tocoo().data)])
                raise InputError(f"{where}: counts contain NaN/inf in rows {self.barcodes[rows[:10]].tolist()}.")
            if (data < 0).any():
                coo = self.counts.tocoo()
                rows = np.unique(coo.row[coo.data < 0])
                raise InputError(
                    f"{where}: counts contain negative values in rows {self.barcodes[rows[:10]].tolist()}."
                )

    def subset(self, keep: np.ndarray) -> "Sample":
        """A copy restricted to the spots selected by a boolean mask or index array (order kept)."""
        keep = np.asarray(keep)
        return Sample(
            sample_id=self.sample_id,
            patient_id=self.patient_id,
            mpp=self.mpp,
            barcodes=self.barcodes[keep],
            centers=self.centers[keep],
            image=self.image,
            counts=None if self.counts is None else self.counts[keep],
            genes=self.genes,
            gene_ids=self.gene_ids,
            array_coords=None if self.array_coords is None else self.array_coords[keep],
            source=self.source,
            patient_known=self.patient_known,
            meta=dict(self.meta),
        )
