"""RegMean (Jin et al., ICLR 2023, *Dataless Knowledge Fusion by Merging Weights of Language Models*).

For a linear layer ``y = x W`` (``W``: ``in × out``; a torch ``Linear`` stores ``Wᵀ``) fine-tuned into
``W_i`` on inputs ``X_i``, the merged ``W`` minimizing ``Σ_i λ_i ‖X_i W − X_i W_i‖²`` is (§3.1, eq. 2)

    W* = (Σ_i λ_i G̃_i)⁻¹ Σ_i λ_i G̃_i W_i,    G_i = X_iᵀ X_i,

with the off-diagonal entries of each Gram scaled by ``α`` (§3.2): ``G̃_i = α G_i + (1 − α) diag(G_i)``.
``α = 0`` gives a per-input-feature weighted average; ``α = 1`` the exact least-squares solution.
Every other parameter (biases, LayerNorm, embeddings) is averaged with the coefficients (or, given
Fisher files, Fisher-weighted).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from jsonargparse.typing import ClosedUnitInterval, NonNegativeFloat

from lightning_merge.merging.base import CONVEX, MergeMethod, Piece
from lightning_merge.merging.formulas import TARGET, Workspace, fisher_merge, isotropic_merge
from lightning_merge.merging.tensors import Statistics
from lightning_merge.statistics.gram_file import GramInput

Alpha = ClosedUnitInterval  # [0, 1], checked when a config is parsed
SINGULAR_PIVOT = 1e-12  # a Cholesky pivot² below this × the largest diagonal entry: numerically singular


ROWS = 256  # rows of a Gram converted to float64 at a time: no full float64 copy of any Gram


def _row_blocks(d: int) -> list[tuple[int, int]]:
    return [(start, min(start + ROWS, d)) for start in range(0, d, ROWS)]


def regmean_factor(grams: Sequence[torch.Tensor], coefficients: Sequence[float], alpha: float,
                   workspace: Workspace | None = None) -> torch.Tensor | None:
    """The Cholesky factor (float64) of ``A = Σ_i λ_i G̃_i`` with ``G̃_i = α G_i + (1 − α) diag(G_i)``
    (§3.2), or ``None`` when ``A`` is (numerically) singular. ``A`` is built block-row by block-row and
    factored in place: one ``d × d`` float64 buffer, ``workspace``'s ``"factor"`` when given (layer after
    layer: a fresh 75 MB buffer for a 3072-wide layer page-faults in anew each time; the caller drops
    the previous factor before asking for the next)."""
    d, device = grams[0].shape[0], grams[0].device
    if workspace is None:
        total = torch.zeros(d, d, dtype=torch.float64, device=device)
    else:
        total = workspace.get("factor", d * d, torch.float64, device).view(d, d).zero_()
    for start, stop in _row_blocks(d):
        for gram, lam in zip(grams, coefficients):
            total[start:stop].add_(gram[start:stop].double(), alpha=lam * alpha)
    for gram, lam in zip(grams, coefficients):
        total.diagonal().add_(gram.diagonal().double(), alpha=lam * (1 - alpha))
    peak = float(total.diagonal().max()) if d else 0.0
    info = torch.empty((), dtype=torch.int32, device=total.device)
    # A is symmetric, so its transpose (a column-major view, LAPACK's own layout) is A: factored in place
    # with no copy each way (a one-off timing, 3072 wide: 170 against 211 ms with a row-major buffer)
    columns = total.T
    factor, info = torch.linalg.cholesky_ex(columns, out=(columns, info))
    if int(info) != 0 or peak <= 0 or float(factor.diagonal().min()) ** 2 <= SINGULAR_PIVOT * peak:
        return None
    return factor


def regmean_rows(rows: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], coefficients: Sequence[float],
                 alpha: float, factor: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """Rows ``r × in`` of the merged torch weight (``W*ᵀ``), from each model's same rows of its weight.

    ``W* = A⁻¹ Σ_i λ_i G̃_i W_i`` is computed as ``W_0 + A⁻¹ Σ_{i>0} λ_i G̃_i (W_i − W_0)`` (the same
    matrix: ``A W_0 = Σ_i λ_i G̃_i W_0``), one product fewer and exact when the models agree, with
    ``G̃_i Δ = α G_i Δ + (1 − α) diag(G_i) Δ``; solved with the Cholesky factor of ``A`` in float64,
    never an explicit inverse: two triangular solves (``L y = R``, ``Lᵀ x = y``), which with a piece's
    few hundred right-hand sides run at GEMM speed where LAPACK's ``potrs`` (``cholesky_solve``) ran
    about 5× slower on CPU. The float64 temporaries live in ``workspace``, reused piece after piece
    (fresh ones page-fault in again whenever freed memory is handed back, as in a streamed merge)."""
    first = rows[0].to(torch.float64, copy=True)  # the result is built in it: never the caller's rows
    if len(rows) == 1:
        return first
    work = workspace or Workspace()
    (r, d), device = first.shape, first.device
    # d × r right-hand sides stored column-major, the layout LAPACK solves in place (a row-major one
    # costs a copy each way)
    rhs = work.get("rhs", d * r, torch.float64, device).view(r, d).T.zero_()
    delta = work.get("delta", r * d, torch.float64, device).view(r, d)
    block = work.get("gram_rows", min(ROWS, d) * d, torch.float64, device)
    for row, gram, lam in zip(rows[1:], grams[1:], coefficients[1:]):
        torch.sub(row, first, out=delta)
        for start, stop in _row_blocks(len(gram)):
            gram_rows = block[:(stop - start) * d].view(stop - start, d).copy_(gram[start:stop])
            rhs[start:stop].addmm_(gram_rows, delta.T, alpha=lam * alpha)
        rhs.addcmul_(gram.diagonal().double().unsqueeze(1), delta.T, value=lam * (1 - alpha))
    torch.linalg.solve_triangular(factor, rhs, upper=False, out=rhs)  # in place, as LAPACK's trsm works
    torch.linalg.solve_triangular(factor.mT, rhs, upper=True, out=rhs)
    return first.add_(rhs.T)


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
        fisher: a per-model Fisher input (e.g. ``fisher``): every parameter that is not a linear weight
            is then Fisher-weighted (NeurIPS paper eq. 4, ``floor``, the target's value below it)
            instead of averaged.
    """

    coefficients = CONVEX

    def __init__(self, gram: str = "gram", alpha: Alpha = 0.9, singular: Literal["average", "error"] = "average",
                 fisher: str | None = None, floor: NonNegativeFloat = 1e-6, name: str = "regmean") -> None:
        if not 0 <= alpha <= 1:
            raise ValueError(f"RegMeanMerge(alpha={alpha}): the off-diagonal scale is in [0, 1]")
        if singular not in ("average", "error"):
            raise ValueError(f"RegMeanMerge(singular={singular!r}): choose 'average' or 'error'")
        super().__init__(name)
        self.model_inputs = (gram,) if fisher is None else (gram, fisher)
        self.field, self.alpha, self.singular, self.fisher, self.floor = gram, alpha, singular, fisher, floor
        self._work = Workspace()
        self._factor: tuple | None = None
        self.singular_layers: set[str] = set()
        self.transposed: set[str] = set()  # weights stored in × out (GPT-2's Conv1D), from the Gram files

    def open_input(self, name, source, shapes, label, in_memory) -> GramInput | Statistics:
        if name == self.fisher:
            return Statistics(source, shapes, label, in_memory=in_memory)
        return GramInput(source, shapes, label, in_memory=in_memory)

    def check_inputs(self, name: str, readers: Sequence[GramInput]) -> None:
        """Every model has a Gram for the same layers."""
        if name != self.field:
            return
        self.transposed = set.union(*(r.transposed for r in readers))
        covered = set.union(*(r.weights for r in readers))
        for reader in readers:
            lacking = sorted(covered - reader.weights)
            if lacking:
                raise ValueError(f"{reader.label} has no Gram for {len(lacking)} layers the other models' Grams "
                                 f"cover: {lacking[:5]}")

    def piece_unit(self, name: str, shape: torch.Size) -> int:
        """Each output unit needs every input feature: whole rows of an ``out × in`` weight, the whole of
        an ``in × out`` one (its output units are columns)."""
        if name in self.transposed:
            return shape.numel()
        return shape[-1] if len(shape) >= 2 else 1

    def _solver(self, grams: list[torch.Tensor], coefficients: list[float]) -> tuple[list[int], torch.Tensor | None]:
        """The active models and the factor of their ``A``, kept while the pieces of one layer (and the
        layers sharing its Grams, q/k/v) come in a row."""
        cached = self._factor
        if cached is not None and cached[1] == coefficients and all(a is b for a, b in zip(cached[0], grams)):
            return cached[2], cached[3]
        self._factor = None  # the previous layer's factor goes before this one is built
        active = [i for i, lam in enumerate(coefficients) if lam > 0]
        factor = regmean_factor([grams[i] for i in active], [coefficients[i] for i in active], self.alpha,
                                self._work)
        self._factor = (grams, coefficients, active, factor)
        return active, factor

    def merge(self, piece: Piece, coefficients, target, out) -> None:
        grams = piece.inputs[self.field]
        if grams[0].numel() == 0:  # not a linear weight: averaged, or Fisher-weighted (eq. 4)
            if self.fisher is None:
                isotropic_merge(piece.thetas, coefficients, out=out)
            else:
                fisher_merge(piece.thetas, piece.inputs[self.fisher], coefficients, self.floor, TARGET, target,
                             out=out, workspace=self._work)
            return
        active, factor = self._solver(grams, list(coefficients))
        if factor is None:
            if self.singular == "error":
                raise ValueError(f"{self.name}: Σ λ_i G̃_i of {piece.name!r} is singular (an input feature no "
                                 f"model's data activates); set alpha < 1, or singular: average")
            if piece.name not in self.singular_layers:
                self.singular_layers.add(piece.name)
                warnings.warn(f"{self.name}: Σ λ_i G̃_i of {piece.name!r} is singular; that weight is averaged",
                              stacklevel=2)
            isotropic_merge(piece.thetas, coefficients, out=out)
            return
        d = grams[0].shape[0]
        transposed = piece.name in self.transposed  # W stored in × out: its transpose has the rows
        rows = [piece.thetas[i].reshape(d, -1).T if transposed else piece.thetas[i].reshape(-1, d) for i in active]
        merged = regmean_rows(rows, [grams[i] for i in active], [coefficients[i] for i in active], self.alpha, factor,
                              self._work)
        out.copy_((merged.T if transposed else merged).reshape(-1))
