"""Stage 3: the diagonal Fisher (NeurIPS paper eq. 2) — per-example math, storage."""

from lightning_merge.fisher.directions import VARIANTS, logit_directions
from lightning_merge.fisher.io import load_fisher, read_fisher_metadata, save_fisher
from lightning_merge.fisher.per_example import PerExampleSquaredGradients

__all__ = ["VARIANTS", "PerExampleSquaredGradients", "load_fisher", "logit_directions", "read_fisher_metadata",
           "save_fisher"]
