"""TRIPLEX (CVPR 2024) as a baseline: the Gene-DML encoders trained with TRIPLEX's objective.

MSE of the fused prediction plus, per scale branch, (1 − α)·MSE(branch) + α·MSE(fusion, branch), α = 0.3;
the contrastive pathways are off. Identical encoders make the comparison with Gene-DML about the objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from genedml.heads.gene_dml import SCALES, GeneDMLHead, GeneDMLSettings


@dataclass(frozen=True)
class TriplexSettings(GeneDMLSettings):
    """GeneDMLSettings with the TRIPLEX objective as the default (contrastive pathways off)."""

    scales: tuple[str, ...] = SCALES  # TRIPLEX's three branches
    objective: Literal["genedml", "triplex"] = "triplex"
    instance: bool = False
    group: bool = False


class TriplexHead(GeneDMLHead):
    """TRIPLEX objective on the Gene-DML encoders."""

    name = "triplex"
    Settings = TriplexSettings

    def __init__(self, settings: TriplexSettings | None = None) -> None:
        super().__init__(settings)
