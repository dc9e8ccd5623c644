"""Merging whole models' bodies (state dicts in, state dict out), with the checks that catch
mismatched inputs before any arithmetic. Task heads are never merged: each task keeps its own."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_merge.merging.formulas import (
    TARGET,
    fisher_global_norm,
    fisher_merge,
    isotropic_merge,
    normalize_coefficients,
)


def shared_body_names(states: Sequence[dict[str, torch.Tensor]], head_names: set[str] = frozenset()) -> list[str]:
    """The names every model has outside its head, after checking they agree in keys and shapes."""
    bodies = [set(s) - set(head_names) for s in states]
    for i, body in enumerate(bodies[1:], start=1):
        if body != bodies[0]:
            only_first, only_other = sorted(bodies[0] - body), sorted(body - bodies[0])
            parts = [f"{len(names)} tensors only in model {k} (e.g. {names[:3]})"
                     for k, names in ((0, only_first), (i, only_other)) if names]
            raise ValueError(f"Models 0 and {i} have different architectures: {'; '.join(parts)}")
    names = sorted(bodies[0])
    for name in names:
        shapes = [tuple(s[name].shape) for s in states]
        if len(set(shapes)) > 1:
            raise ValueError(f"Tensor {name!r} has different shapes across models: {shapes}")
    return names


def check_fisher(fisher: dict[str, torch.Tensor], names: Sequence[str], shapes: dict[str, torch.Size],
                 label: str) -> None:
    """Every name present, shape right, finite and ≥ 0 — or an error naming the offending tensors."""
    missing = [n for n in names if n not in fisher]
    if missing:
        raise KeyError(f"{label} has no Fisher for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name in names:
        f = fisher[name]
        if not f.dtype.is_floating_point:
            raise ValueError(f"{label}: Fisher of {name!r} has dtype {f.dtype}; a Fisher is a mean of squares, "
                             f"stored as floats")
        if tuple(f.shape) != tuple(shapes[name]):
            raise ValueError(f"{label}: Fisher of {name!r} has shape {tuple(f.shape)}, the parameter "
                             f"{tuple(shapes[name])}")
        if f.numel() and float(f.min()) >= 0 and math.isfinite(float(f.sum())):
            continue  # fast path without temporaries: ≥ 0 everywhere and a finite sum means no NaN/Inf
        if not torch.isfinite(f).all():
            raise ValueError(f"{label}: Fisher of {name!r} has NaN or Inf entries")
        if (f < 0).any():
            raise ValueError(f"{label}: Fisher of {name!r} has negative entries")


def merge_bodies(states: Sequence[dict[str, torch.Tensor]], coefficients: Sequence[float],
                 fishers: Sequence[dict[str, torch.Tensor]] | None = None, *, head_names: set[str] = frozenset(),
                 floor: float = 1e-6, fallback: str = TARGET, target: int = 0,
                 normalize: bool = False) -> dict[str, torch.Tensor]:
    """Merge the shared bodies of ``states``: isotropic without ``fishers``, eq. 4 with them."""
    if len(states) < 2:
        raise ValueError(f"merging needs at least 2 models, got {len(states)}")
    if not 0 <= target < len(states):
        raise ValueError(f"target index {target} out of range for {len(states)} models")
    lam = normalize_coefficients(coefficients, len(states))
    names = shared_body_names(states, head_names)
    if fishers is None:
        return {n: isotropic_merge([s[n] for s in states], lam) for n in names}
    if len(fishers) != len(states):
        raise ValueError(f"{len(fishers)} Fishers for {len(states)} models")
    shapes = {n: states[0][n].shape for n in names}
    for i, fisher in enumerate(fishers):
        check_fisher(fisher, names, shapes, f"model {i}")
    scales = [1.0 / fisher_global_norm({n: f[n] for n in names}) for f in fishers] if normalize else None
    return {n: fisher_merge([s[n] for s in states], [f[n] for f in fishers], lam, floor, fallback, target, scales)
            for n in names}
