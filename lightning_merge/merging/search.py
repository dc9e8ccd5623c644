"""Which merging coefficients to try: fixed, a grid for two models, Dirichlet samples for N models
(convex weights of an average), and scale grids for task-vector methods.

Candidates are plain lists of ``λ`` (one per model, ``λ_i ≥ 0``), in the order of the model specs;
averaging methods normalize them to sum 1, task-vector methods use them as scales. Chosen by
``class_path`` in YAML.
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


class ScaleSearch(CoefficientSearch):
    """Scales of task vectors (task arithmetic, TIES, DARE): ``λ`` is not a convex weight but how far
    to move from the pre-trained model. By default one shared scale ``λ_i = λ`` on ``values`` (the task
    arithmetic paper's 0.05…1 grid, extended to 1.5); with ``per_model``, every combination of
    per-model scales from ``values`` when there are at most ``samples`` of them, else ``samples``
    seeded draws (the shared-scale candidates always come first)."""

    def __init__(self, values: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5),
                 per_model: bool = False, samples: PositiveInt = 256, seed: int = 0) -> None:
        self.values = [float(v) for v in values]
        if not self.values or min(self.values) < 0 or max(self.values) <= 0:
            raise ValueError(f"ScaleSearch(values={self.values}): scales must be >= 0, with one > 0")
        self.per_model, self.samples, self.seed = per_model, samples, seed

    def candidates(self, num_models, target=0):
        shared = [[v] * num_models for v in self.values if v > 0]
        if not self.per_model:
            return shared
        if len(self.values) ** num_models <= self.samples:
            grid = np.array(np.meshgrid(*[self.values] * num_models, indexing="ij")).reshape(num_models, -1).T
            drawn = [list(map(float, row)) for row in grid if row.sum() > 0]
        else:
            rng = np.random.default_rng(self.seed)
            drawn = rng.choice(self.values, size=(self.samples, num_models)).tolist()
        return shared + [c for c in drawn if c not in shared and sum(c) > 0]
