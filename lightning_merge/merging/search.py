"""Which merging coefficients to try: fixed, a grid for two models, Dirichlet samples for N models.

Candidates are plain lists of ``λ`` (one per model, ``λ_i ≥ 0``, ``Σ λ_i = 1``), in the order of the
model specs. Chosen by ``class_path`` in YAML.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from jsonargparse.typing import PositiveFloat, PositiveInt, restricted_number_type

GridPoints = restricted_number_type("GridPoints", int, (">=", 2))


class CoefficientSearch:
    def candidates(self, num_models: int, target: int = 0) -> list[list[float]]:
        raise NotImplementedError


class FixedCoefficients(CoefficientSearch):
    """One candidate: ``coefficients`` (normalized to sum 1), or equal weights ``1/M`` when left out
    (the ensembling setup of NeurIPS paper §3.1; paper 003's ``λ = 1`` for every model)."""

    def __init__(self, coefficients: Sequence[float] | None = None) -> None:
        self.coefficients = None if coefficients is None else [float(c) for c in coefficients]
        if self.coefficients is not None and (min(self.coefficients) < 0 or sum(self.coefficients) <= 0):
            raise ValueError(f"FixedCoefficients(coefficients={self.coefficients}): coefficients must be >= 0 and "
                             f"not all zero")

    def candidates(self, num_models, target=0):
        if self.coefficients is None:
            return [[1.0 / num_models] * num_models]
        if len(self.coefficients) != num_models:
            raise ValueError(f"FixedCoefficients: {len(self.coefficients)} coefficients for {num_models} models")
        total = sum(self.coefficients)
        if total <= 0 or min(self.coefficients) < 0:
            raise ValueError(f"coefficients must be >= 0 and not all zero, got {self.coefficients}")
        return [[c / total for c in self.coefficients]]


class GridSearch(CoefficientSearch):
    """Two models: the target's ``λ`` on ``points`` evenly spaced values in [0, 1], endpoints included,
    the other model ``1 − λ`` (NeurIPS paper §3.1.1 uses 50 points; WiSE-FT, §3.2, 11 points)."""

    def __init__(self, points: GridPoints = 50) -> None:
        if points < 2:
            raise ValueError(f"GridSearch(points={points}): a grid needs at least 2 points")
        self.points = points

    def candidates(self, num_models, target=0):
        if num_models != 2:
            raise ValueError(f"GridSearch merges 2 models, got {num_models}: use DirichletSearch for more")
        out = []
        for lam in np.linspace(0.0, 1.0, self.points).tolist():
            pair = [round(1.0 - lam, 12)] * 2  # 0.1, not 0.09999999999999998, in tables
            pair[target] = round(lam, 12)
            out.append(pair)
        return out


class DirichletSearch(CoefficientSearch):
    """``samples`` coefficient vectors drawn from ``Dirichlet(alpha·1)`` (NeurIPS paper appendix B
    used 2500 for N models), seeded; the uniform vector ``1/M`` is always tried first."""

    def __init__(self, samples: PositiveInt = 2500, alpha: PositiveFloat = 1.0, seed: int = 0) -> None:
        if samples < 1 or alpha <= 0:
            raise ValueError(f"DirichletSearch needs samples >= 1 and alpha > 0, got {samples}, {alpha}")
        self.samples, self.alpha, self.seed = samples, alpha, seed

    def candidates(self, num_models, target=0):
        rng = np.random.default_rng(self.seed)
        drawn = rng.dirichlet([self.alpha] * num_models, size=self.samples - 1).tolist()
        return [[1.0 / num_models] * num_models, *drawn]
