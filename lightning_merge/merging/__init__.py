"""Stage 4: merging. A method is one class (:class:`MergeMethod`: what it reads, how it merges a piece);
the driver (:class:`MergePlan`) validates its inputs once and runs it in memory or streamed alike.

Methods: isotropic and Fisher averaging (NeurIPS paper §2, eq. 4; paper 003 §3 for mask-node
Fishers), task arithmetic, TIES, DARE and RegMean. Coefficient searches: fixed, grid, Dirichlet, scale grids.
"""

from lightning_merge.merging.base import BASE, CONVEX, SCALE, MergeMethod, Piece
from lightning_merge.merging.driver import CHUNK, MergePlan, merged_state
from lightning_merge.merging.flat import FlatLayout, FlatMerger
from lightning_merge.merging.formulas import (
    ISOTROPIC,
    TARGET,
    check_coefficients,
    fisher_merge,
    isotropic_merge,
    normalize_coefficients,
)
from lightning_merge.merging.methods import FisherMerge, IsotropicMerge
from lightning_merge.merging.regmean import RegMeanMerge
from lightning_merge.merging.search import (
    CoefficientSearch,
    DirichletSearch,
    FixedCoefficients,
    GridSearch,
    ScaleSearch,
)
from lightning_merge.merging.state_dicts import merge_bodies, merge_state_dicts, shared_body_names
from lightning_merge.merging.streaming import merge_checkpoints, merge_safetensors
from lightning_merge.merging.task_vectors import DareMerge, TaskArithmetic, TiesMerging
from lightning_merge.merging.tensors import CheckpointTensors, MemoryTensors, Statistics, check_statistics

__all__ = ["BASE", "CHUNK", "CONVEX", "ISOTROPIC", "SCALE", "TARGET", "CheckpointTensors", "CoefficientSearch",
           "DareMerge", "DirichletSearch", "FisherMerge", "FixedCoefficients", "FlatLayout", "FlatMerger",
           "GridSearch", "IsotropicMerge", "MemoryTensors", "MergeMethod", "MergePlan", "Piece", "RegMeanMerge",
           "ScaleSearch", "Statistics", "TaskArithmetic", "TiesMerging", "check_coefficients", "check_statistics",
           "fisher_merge", "isotropic_merge", "merge_bodies", "merge_checkpoints", "merge_safetensors",
           "merge_state_dicts", "merged_state", "normalize_coefficients", "shared_body_names"]
