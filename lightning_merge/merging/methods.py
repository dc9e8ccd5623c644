"""Merge methods, chosen by ``class_path`` in YAML: :class:`IsotropicMerge` and :class:`FisherMerge`.

Mask-node Fisher merging (paper 003 §3) is :class:`FisherMerge` reading a mask Fisher file: the file's
header says it holds masks, and its layout expands them to parameter shapes here, tensor by tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat

from lightning_merge.fisher.io import load_fisher, read_fisher_metadata
from lightning_merge.fisher.masks import PAPER, RELEASED, expand_mask_fisher
from lightning_merge.merging.formulas import ISOTROPIC, TARGET, fisher_global_norm, fisher_merge, isotropic_merge
from lightning_merge.merging.state_dicts import check_fisher

FISHER_FIELDS = ("fisher", "mask_fisher")


class MergeMethod:
    """Combines tensors of M models with coefficients ``λ``; ``name`` labels its rows in result tables."""

    #: which field of a model spec holds this method's per-model weights (None: no weights needed)
    fisher_field: str | None = None

    def __init__(self, name: str) -> None:
        self.name = name

    def load_weights(self, path: str | os.PathLike, shapes: Mapping[str, torch.Size],
                     label: str) -> dict[str, torch.Tensor] | None:
        return None

    def scales(self, weights: Sequence[Mapping[str, torch.Tensor]] | None) -> list[float] | None:
        return None

    def merge_tensor(self, tensors: Sequence[torch.Tensor], weights: Sequence[torch.Tensor] | None,
                     coefficients: torch.Tensor, target: int, scales: Sequence[float] | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class IsotropicMerge(MergeMethod):
    """``θ* = Σ λ_i θ_i`` (NeurIPS paper §2.2): plain (weighted) parameter averaging."""

    def __init__(self, name: str = "isotropic") -> None:
        super().__init__(name)

    def merge_tensor(self, tensors, weights, coefficients, target, scales=None, out=None):
        return isotropic_merge(tensors, coefficients, out=out)


class FisherMerge(MergeMethod):
    """Fisher-weighted averaging, eq. 4 of the NeurIPS paper.

    Args:
        fisher: the model-spec field with the Fisher file: ``fisher`` (diagonal Fisher) or
            ``mask_fisher`` (mask-node Fisher, paper 003 §3, expanded with ``mask_rule``).
        floor: where every taking-part model's Fisher is below it, use ``fallback`` (``target``: the
            target model's value; ``isotropic``: the plain average).
        normalize: scale each model's Fisher to unit L2 norm first (reference implementation option).
        mask_rule: ``paper`` (003 §3 rules) or ``released`` (the authors' code), for mask Fishers.
        name: row label (default ``fisher`` / ``mask_fisher``).
    """

    def __init__(self, fisher: Literal["fisher", "mask_fisher"] = "fisher", floor: NonNegativeFloat = 1e-6,
                 fallback: Literal["target", "isotropic"] = TARGET, normalize: bool = False,
                 mask_rule: Literal["paper", "released"] = PAPER, name: str | None = None) -> None:
        if fisher not in FISHER_FIELDS:
            raise ValueError(f"FisherMerge(fisher={fisher!r}): choose one of {FISHER_FIELDS}")
        if fallback not in (TARGET, ISOTROPIC):
            raise ValueError(f"Unknown Fisher fallback {fallback!r}; choose {TARGET!r} or {ISOTROPIC!r}")
        if mask_rule not in (PAPER, RELEASED):
            raise ValueError(f"Unknown mask rule {mask_rule!r}; choose {PAPER!r} or {RELEASED!r}")
        if floor < 0:
            raise ValueError(f"floor must be >= 0, got {floor}")
        super().__init__(name or fisher)
        self.fisher_field, self.floor, self.fallback = fisher, floor, fallback
        self.normalize, self.mask_rule = normalize, mask_rule

    def load_weights(self, path, shapes, label):
        return load_merge_weights(path, shapes, label, self.mask_rule)

    def scales(self, weights):
        if not self.normalize:
            return None
        return [1.0 / fisher_global_norm(dict(w)) for w in weights]

    def merge_tensor(self, tensors, weights, coefficients, target, scales=None, out=None):
        return fisher_merge(tensors, weights, coefficients, self.floor, self.fallback, target, scales, out=out)


def load_merge_weights(path: str | os.PathLike, shapes: Mapping[str, torch.Size], label: str,
                       mask_rule: str = PAPER) -> dict[str, torch.Tensor]:
    """The per-parameter weights a Fisher file gives for the parameters in ``shapes``: the diagonal
    Fisher itself, or a mask Fisher expanded by ``mask_rule``. Checked: present, shaped, finite, ≥ 0."""
    metadata = read_fisher_metadata(path)
    if metadata.get("kind") == "mask":
        layout = metadata.get("mask_layout")
        if not isinstance(layout, dict):
            raise ValueError(f"{path} is a mask Fisher without a mask_layout in its header")
        masks = load_fisher(path, sorted(layout))
        for name, value in masks.items():
            if not value.dtype.is_floating_point:
                raise ValueError(f"{label}: mask Fisher {name!r} in {path} has dtype {value.dtype}, not floats")
            if not torch.isfinite(value).all() or (value < 0).any():
                raise ValueError(f"{label}: mask Fisher {name!r} in {path} has NaN, Inf or negative entries")
        weights = expand_mask_fisher(masks, layout, dict(shapes), mask_rule)
    else:
        weights = load_fisher(path, sorted(shapes))
    check_fisher(weights, list(shapes), shapes, f"{label} ({path})")
    return weights
