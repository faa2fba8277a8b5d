"""The extra genedml rows of `genedml cv` (`--ablation NAME`): what each changes, its row label and its help.

Torch-free on purpose: the CLI builds its `--ablation` help from this table at import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class Ablation:
    """One extra genedml row of a cv table: the head settings it changes, its row label and its `--ablation` help."""

    overrides: dict[str, Any]
    label: str
    help: str


ABLATIONS: dict[str, Ablation] = {
    "no-group": Ablation({"group": False}, "genedml − group", "no instance–group term"),
    "no-instance": Ablation({"instance": False}, "genedml − instance", "no multi-scale instance term"),
    "no-global": Ablation({"scales": ["local"]}, "genedml − global", "the local scale only"),
    # The default head leaves out the neighbour scale (gene_dml.DEFAULT_SCALES); this row puts back all of
    # gene_dml.SCALES (spelled out here so that `genedml --help` does not import torch; a test keeps them equal).
    "paper-scales": Ablation({"scales": ["local", "neighbor", "global"]}, "genedml + neighbour (the paper's three scales)",
                             "adds the neighbour scale: the authors' three scales"),
    "full-width": Ablation({"encoder_dim": 0}, "genedml, encoders at the backbone width",
                           "encoders at the backbone width, as the authors; the default caps them at 128"),
    "no-input-dropout": Ablation({"input_dropout": 0}, "genedml − input-dropout",
                                 "no dropout on the backbone features, as the authors"),
    "paper-loss-weights": Ablation({"instance_weight": 1.0, "lambda_group": 0.8}, "genedml, the paper's loss weights",
                                   "contrastive weights 1 and λ 0.8, as the authors; the default weighs both 0.1"),
    "cld": Ablation({"group_form": "cld"}, "genedml (CLD group form)", "the CLD form of the group term"),
    # The plain baseline every head must beat: a local-only regression MLP (no contrastive pathway).
    "mlp": Ablation({"instance": False, "group": False, "scales": ["local"], "encoder_dim": 0},
                    "MLP (local only, regression only)", "local-only regression, the baseline every head must beat"),
}
# The authors' model: every named deviation of the defaults undone at once (README, "Named deviations").
NAMED_DEVIATIONS = ("paper-scales", "full-width", "no-input-dropout", "paper-loss-weights")
ABLATIONS["authors"] = Ablation(
    {k: v for name in NAMED_DEVIATIONS for k, v in ABLATIONS[name].overrides.items()} | {"average_weights": False},
    "genedml as the authors (no named deviation)",
    f"all of {', '.join(NAMED_DEVIATIONS)} and average_weights=false: the authors' model",
)
ABLATION_HELP = "Extra genedml variants (repeatable): " + "; ".join(f"{name} ({a.help})" for name, a in ABLATIONS.items()) + "."
