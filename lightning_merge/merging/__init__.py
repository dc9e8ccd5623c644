"""Stage 4: merging (NeurIPS paper §2, eq. 4; paper 003 §3 for mask-node Fishers)."""

from lightning_merge.merging.formulas import (
    ISOTROPIC,
    TARGET,
    fisher_global_norm,
    fisher_merge,
    isotropic_merge,
    normalize_coefficients,
)
from lightning_merge.merging.state_dicts import check_fisher, merge_bodies, shared_body_names

__all__ = ["ISOTROPIC", "TARGET", "check_fisher", "fisher_global_norm", "fisher_merge", "isotropic_merge",
           "merge_bodies", "normalize_coefficients", "shared_body_names"]
