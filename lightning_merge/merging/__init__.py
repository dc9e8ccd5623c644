"""Stage 4: merging (NeurIPS paper §2, eq. 4; paper 003 §3 for mask-node Fishers)."""

from lightning_merge.merging.flat import FlatLayout, FlatMerger
from lightning_merge.merging.formulas import (
    ISOTROPIC,
    TARGET,
    fisher_global_norm,
    fisher_merge,
    isotropic_merge,
    normalize_coefficients,
)
from lightning_merge.merging.methods import FisherMerge, IsotropicMerge, MergeMethod, load_merge_weights
from lightning_merge.merging.search import CoefficientSearch, DirichletSearch, FixedCoefficients, GridSearch
from lightning_merge.merging.state_dicts import check_fisher, merge_bodies, shared_body_names
from lightning_merge.merging.streaming import merge_safetensors

__all__ = ["ISOTROPIC", "TARGET", "CoefficientSearch", "DirichletSearch", "FisherMerge", "FixedCoefficients",
           "FlatLayout", "FlatMerger", "GridSearch", "IsotropicMerge", "MergeMethod", "check_fisher",
           "fisher_global_norm", "fisher_merge", "isotropic_merge", "load_merge_weights", "merge_bodies",
           "merge_safetensors", "normalize_coefficients", "shared_body_names"]
