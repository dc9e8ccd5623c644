"""Averaging methods, chosen by ``class_path`` in YAML: :class:`IsotropicMerge` and :class:`FisherMerge`.

Mask-node Fisher merging (paper 003 §3) is :class:`FisherMerge` reading a mask Fisher file: the file's
header says it holds masks, and its layout expands them to parameter shapes, tensor by tensor.
"""

from __future__ import annotations

from typing import Literal

from jsonargparse.typing import NonNegativeFloat

from lightning_merge.fisher.masks import PAPER
from lightning_merge.merging.base import MergeMethod, Piece
from lightning_merge.merging.formulas import TARGET, Workspace, fisher_merge, isotropic_merge
from lightning_merge.merging.tensors import Statistics


class IsotropicMerge(MergeMethod):
    """``θ* = Σ λ_i θ_i`` (NeurIPS paper §2.2): plain (weighted) parameter averaging."""

    def __init__(self, name: str = "isotropic") -> None:
        super().__init__(name)

    def merge(self, piece: Piece, coefficients, target, out) -> None:
        isotropic_merge(piece.thetas, coefficients, out=out)


class FisherMerge(MergeMethod):
    """Fisher-weighted averaging, eq. 4 of the NeurIPS paper:
    ``θ*_j = Σ_i λ_i F_i,j θ_i,j / Σ_i λ_i F_i,j``.

    Args:
        fisher: the per-model input holding the Fisher: ``fisher`` (diagonal Fisher) or ``mask_fisher``
            (mask-node Fisher, paper 003 §3 eq. 5, expanded with ``mask_rule``); any other name of a
            model's ``inputs`` works the same way.
        floor: where every taking-part model's Fisher is below it, use ``fallback`` (``target``: the
            target model's value; ``isotropic``: the plain average). The papers use 1e-6 (GLUE).
        normalize: scale each model's Fisher to unit L2 norm over the merged tensors first (an option
            of the reference implementation).
        mask_rule: ``paper`` (003 §3 rules) or ``released`` (the authors' code), for mask Fishers.
        name: row label (default: the input's name, ``fisher`` / ``mask_fisher``).
    """

    def __init__(self, fisher: str = "fisher", floor: NonNegativeFloat = 1e-6,
                 fallback: Literal["target", "isotropic"] = TARGET, normalize: bool = False,
                 mask_rule: Literal["paper", "released"] = PAPER, name: str | None = None) -> None:
        if floor < 0:
            raise ValueError(f"FisherMerge(floor={floor}): must be >= 0")
        super().__init__(name or fisher)
        self.model_inputs = (fisher,)
        self.field, self.floor, self.fallback, self.normalize, self.mask_rule = fisher, floor, fallback, normalize, \
            mask_rule
        self.scales: list[float] | None = None
        self._work = Workspace()

    def open_input(self, name, source, shapes, label, in_memory) -> Statistics:
        return Statistics(source, shapes, label, mask_rule=self.mask_rule, in_memory=in_memory)

    def prepare(self, pieces, num_models) -> None:
        if not self.normalize:
            self.scales = None
            return
        totals = [0.0] * num_models  # float64 sums in piece order: the same in memory and streamed
        for piece in pieces():
            for i, f in enumerate(piece.inputs[self.field]):
                totals[i] += float(f.double().pow(2).sum())
        zero = [i for i, t in enumerate(totals) if t <= 0]
        if zero:
            raise ValueError(f"{self.name}: the Fisher of models {zero} is zero everywhere: it cannot be normalized")
        self.scales = [t**-0.5 for t in totals]

    def merge(self, piece, coefficients, target, out) -> None:
        fisher_merge(piece.thetas, piece.inputs[self.field], coefficients, self.floor, self.fallback, target,
                     self.scales, out=out, workspace=self._work)
