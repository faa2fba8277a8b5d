"""Checks and joins shared by the readers: unique barcodes, unique gene names, spot table ⋈ counts table by
barcode."""

from __future__ import annotations

from collections import Counter

import numpy as np
import scipy.sparse as sp

from genedml.errors import InputError
from genedml.log import log



def check_unique(barcodes: np.ndarray, where: str, what: str = "spot table") -> None:
    """Raise an InputError naming the duplicated barcodes and their rows (0-based data rows)."""
    barcodes = np.asarray(barcodes).astype(str)
    uniq, inverse, counts = np.unique(barcodes, return_inverse=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        rows = np.flatnonzero(counts[inverse] > 1)
        raise InputError(
            f"{where}: {len(dup)} duplicate barcodes in the {what}, e.g. {dup[:5].tolist()} "
            f"(data rows {rows[:10].tolist()}). Each spot must appear once."
        )


def check_not_empty(n_spots: int, where: str, what: str) -> None:
    """An empty sample is an error users can fix (wrong file, wrong filter), not an empty result."""
    if n_spots == 0:
        raise InputError(f"{where}: the sample has no spots ({what}).")


def unique_gene_names(genes: np.ndarray, where: str) -> np.ndarray:
    """Gene names made unique as scanpy's ``var_names_make_unique`` does: the first GENE stays, later ones become
    GENE-1, GENE-2 … (skipping names already taken). Logs a warning naming a few duplicates."""
    genes = np.asarray(genes).astype(str)
    seen = Counter(genes.tolist())
    duplicated = sorted(g for g, n in seen.items() if n > 1)
    if not duplicated:
        return genes
    taken, suffix, first = set(seen), Counter(), set()
    out = genes.astype(object)
    for i, gene in enumerate(genes):
        if gene not in first:
            first.add(gene)
            continue
        while True:
            suffix[gene] += 1
            candidate = f"{gene}-{suffix[gene]}"
            if candidate not in taken:
                taken.add(candidate)
                out[i] = candidate
                break
    log.warning(
        "%s: %d gene names occur more than once (e.g. %s); made unique as GENE, GENE-1, GENE-2 … like scanpy's "
        "var_names_make_unique (gene ids are kept where the file has them)", where, len(duplicated), duplicated[:5],
    )
    return out.astype(str)


def join_counts(
    spot_barcodes: np.ndarray, count_barcodes: np.ndarray, counts: sp.spmatrix, where: str
) -> tuple[np.ndarray, sp.csr_matrix]:
    """Rows of `counts` aligned to the spot table by barcode (never by row order).

    Returns (keep, aligned): `keep` masks the spots that have a count row; `aligned` holds their counts in
    spot-table order. Spots without counts are dropped and logged; no shared barcode at all is an error.
    """
    spot_barcodes = np.asarray(spot_barcodes).astype(str)
    count_barcodes = np.asarray(count_barcodes).astype(str)
    check_unique(count_barcodes, where, "counts table")
    row_of = {b: i for i, b in enumerate(count_barcodes)}
    rows = np.array([row_of.get(b, -1) for b in spot_barcodes], dtype=np.int64)
    keep = rows >= 0
    if not keep.any():
        raise InputError(
            f"{where}: the counts table shares no barcode with the spot table (spots e.g. "
            f"{spot_barcodes[:3].tolist()}, counts e.g. {count_barcodes[:3].tolist()}). Do the files belong to "
            "the same sample?"
        )
    if not keep.all():
        log.info("%s: dropped %d of %d spots without counts", where, int((~keep).sum()), len(keep))
    return keep, sp.csr_matrix(counts)[rows[keep]]


def snap_to_grid(centers: np.ndarray) -> np.ndarray:
    """Integer grid positions for spots without array coordinates: pitch = median nearest-neighbour distance."""
    centers = np.asarray(centers, dtype=np.float64)
    if len(centers) < 2:
        return np.zeros((len(centers), 2), dtype=np.int64)
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(centers).query(centers, k=2)
    pitch = float(np.median(dist[:, 1])) or 1.0
    return np.rint((centers - centers.min(axis=0)) / pitch).astype(np.int64)
