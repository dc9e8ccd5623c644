"""RegMean (Jin et al., ICLR 2023, *Dataless Knowledge Fusion by Merging Weights of Language Models*).

For a linear layer ``y = x W`` (``W``: ``in × out``; a torch ``Linear`` stores ``Wᵀ``) fine-tuned into
``W_i`` on inputs ``X_i``, the merged ``W`` minimizing ``Σ_i λ_i ‖X_i W − X_i W_i‖²`` is (§3.1, eq. 2)

    W* = (Σ_i λ_i G̃_i)⁻¹ Σ_i λ_i G̃_i W_i,    G_i = X_iᵀ X_i,

with the off-diagonal entries of each Gram scaled by ``α`` (§3.2): ``G̃_i = α G_i + (1 − α) diag(G_i)``.
``α = 0`` gives a per-input-feature weighted average; ``α = 1`` the exact least-squares solution.
Every other parameter (biases, LayerNorm, embeddings) is averaged with the coefficients.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from jsonargparse.typing import ClosedUnitInterval

from lightning_merge.merging.base import CONVEX, MergeMethod, Piece
from lightning_merge.statistics.gram_file import GramInput

Alpha = ClosedUnitInterval  # [0, 1], checked when a config is parsed
SINGULAR_PIVOT = 1e-12  # a Cholesky pivot² below this × the largest diagonal entry: numerically singular


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α G + (1 − α) diag(G)`` (§3.2), in the Gram's dtype."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_factor(grams: Sequence[torch.Tensor], coefficients: Sequence[float], alpha: float):
    """The scaled Grams ``λ_i G̃_i`` (float64) and the Cholesky factor of their sum, or ``None`` for the
    factor when the sum is (numerically) singular."""
    scaled = [reduce_off_diagonal(g.double(), alpha) * lam for g, lam in zip(grams, coefficients)]
    total = torch.stack(scaled).sum(0) if len(scaled) > 1 else scaled[0]
    factor, info = torch.linalg.cholesky_ex(total)
    peak = float(total.diagonal().max()) if len(total) else 0.0
    if int(info) != 0 or peak <= 0 or float(factor.diagonal().min()) ** 2 <= SINGULAR_PIVOT * peak:
        return scaled, None
    return scaled, factor


def regmean_rows(rows: Sequence[torch.Tensor], scaled: Sequence[torch.Tensor], factor: torch.Tensor) -> torch.Tensor:
    """Rows ``r × in`` of the merged torch weight (``W*ᵀ``), from each model's same rows of its weight:
    ``W*[:, rows] = A⁻¹ Σ_i λ_i G̃_i W_i[:, rows]`` solved with the Cholesky factor of ``A`` (float64,
    never an explicit inverse)."""
    rhs = sum(g @ r.double().T for g, r in zip(scaled, rows))
    return torch.cholesky_solve(rhs, factor).T


def _average(piece: Piece, coefficients, out: torch.Tensor) -> None:
    out.zero_()
    for lam, theta in zip(coefficients, piece.thetas):
        if lam:
            out.add_(theta, alpha=lam)


class RegMeanMerge(MergeMethod):
    """RegMean (Jin et al., ICLR 2023, §3, eq. 2 with §3.2's ``α``): every body linear weight solved from
    the models' Gram matrices (per-model input ``gram``: a Gram file from ``GramEstimationModule``);
    every other parameter averaged with the coefficients ``λ_i`` (which also weight the Grams).

    Args:
        gram: the per-model input holding the Grams (``ModelSpec.inputs``).
        alpha: scale of the Grams' off-diagonal entries, in ``[0, 1]``. The paper tunes it on held-out
            data; 0.9 here (FusionBench uses 0.95 for CLIP).
        singular: where ``Σ λ_i G̃_i`` is singular (an input feature never active in any model's data,
            with ``α = 1`` or an all-zero diagonal), ``average`` that layer's weights with a warning, or
            ``error``.
    """

    coefficients = CONVEX
    whole_rows = True  # a piece holds whole rows of a weight: each row needs every input feature

    def __init__(self, gram: str = "gram", alpha: Alpha = 0.9, singular: Literal["average", "error"] = "average",
                 name: str = "regmean") -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"RegMeanMerge(alpha={alpha}): the off-diagonal scale is in [0, 1]")
        if singular not in ("average", "error"):
            raise ValueError(f"RegMeanMerge(singular={singular!r}): choose 'average' or 'error'")
        super().__init__(name)
        self.model_inputs = (gram,)
        self.field, self.alpha, self.singular = gram, alpha, singular
        self._factor: tuple | None = None
        self.singular_layers: set[str] = set()

    def open_input(self, name, source, shapes, label, in_memory) -> GramInput:
        return GramInput(source, shapes, label, in_memory=in_memory)

    def check_inputs(self, name: str, readers: Sequence[GramInput]) -> None:
        """Every model has a Gram for the same layers."""
        covered = set.union(*(r.weights for r in readers))
        for i, reader in enumerate(readers):
            lacking = sorted(covered - reader.weights)
            if lacking:
                raise ValueError(f"{reader.label} has no Gram for {len(lacking)} layers the other models' Grams "
                                 f"cover: {lacking[:5]}")

    def _solver(self, grams: list[torch.Tensor], coefficients: list[float]):
        cached = self._factor
        if cached is not None and cached[2] == coefficients and all(a is b for a, b in zip(cached[0], grams)):
            return cached[1], cached[3]
        active = [i for i, lam in enumerate(coefficients) if lam > 0]
        scaled, factor = regmean_factor([grams[i] for i in active], [coefficients[i] for i in active], self.alpha)
        self._factor = (grams, active, coefficients, (scaled, factor))
        return active, (scaled, factor)

    def merge(self, piece: Piece, coefficients, target, out) -> None:
        grams = piece.inputs[self.field]
        if grams[0].numel() == 0:  # not a linear weight: the λ-weighted average
            _average(piece, coefficients, out)
            return
        active, (scaled, factor) = self._solver(grams, list(coefficients))
        if factor is None:
            if self.singular == "error":
                raise ValueError(f"{self.name}: Σ λ_i G̃_i of {piece.name!r} is singular (an input feature no "
                                 f"model's data activates); set alpha < 1, or singular: average")
            if piece.name not in self.singular_layers:
                self.singular_layers.add(piece.name)
                warnings.warn(f"{self.name}: Σ λ_i G̃_i of {piece.name!r} is singular; that weight is averaged",
                              stacklevel=2)
            _average(piece, coefficients, out)
            return
        d = grams[0].shape[0]
        rows = [piece.thetas[i].reshape(-1, d) for i in active]
        out.copy_(regmean_rows(rows, scaled, factor).reshape(-1))
