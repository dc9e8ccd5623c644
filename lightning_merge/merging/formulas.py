"""The merge formulas on plain tensors (no Lightning, no files).

* isotropic merge (NeurIPS paper §2.2): ``θ* = Σ_i λ_i θ_i``;
* Fisher merge (eq. 4): ``θ*_j = Σ_i λ_i F_i,j θ_i,j / Σ_i λ_i F_i,j`` with ``λ_i ≥ 0``, ``Σ λ_i = 1``;
  mask-node Fisher merging (paper 003 §3, eq. 5) is the same formula fed expanded mask Fishers.
* Fisher floor (§2.4 / reference implementation): where every Fisher that takes part (``λ_i > 0``)
  is below ``floor``, eq. 4 is numerically meaningless; the result there falls back to the target
  model's value (``fallback="target"``) or to the isotropic average (``fallback="isotropic"``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TARGET, ISOTROPIC = "target", "isotropic"


def normalize_coefficients(coefficients: Sequence[float], num_models: int) -> torch.Tensor:
    """Check ``λ`` (count, ≥ 0, not all zero, finite) and scale it to sum to 1."""
    lam = torch.as_tensor(list(coefficients), dtype=torch.float64)
    if lam.numel() != num_models:
        raise ValueError(f"{lam.numel()} merging coefficients for {num_models} models")
    if not torch.isfinite(lam).all() or (lam < 0).any():
        raise ValueError(f"merging coefficients must be finite and >= 0, got {lam.tolist()}")
    if lam.sum() <= 0:
        raise ValueError("merging coefficients are all zero")
    return lam / lam.sum()


def isotropic_merge(tensors: Sequence[torch.Tensor], coefficients: torch.Tensor) -> torch.Tensor:
    """``Σ_i λ_i θ_i`` (NeurIPS paper §2.2), computed in float32 or wider, returned in θ's dtype."""
    acc_dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    out = torch.zeros(tensors[0].shape, dtype=acc_dtype, device=tensors[0].device)
    for lam, theta in zip(coefficients.tolist(), tensors):
        if lam:
            out.add_(theta.to(acc_dtype), alpha=lam)
    return out.to(tensors[0].dtype)


def fisher_merge(tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], coefficients: torch.Tensor,
                 floor: float = 1e-6, fallback: str = TARGET, target: int = 0,
                 fisher_scales: Sequence[float] | None = None) -> torch.Tensor:
    """Eq. 4 for one tensor. ``fisher_scales[i]`` multiplies model i's Fisher (e.g. ``1/‖F_i‖₂`` when
    normalizing each Fisher to unit norm, as the reference implementation offers)."""
    if fallback not in (TARGET, ISOTROPIC):
        raise ValueError(f"Unknown Fisher fallback {fallback!r}; choose {TARGET!r} or {ISOTROPIC!r}")
    acc_dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    numerator = torch.zeros(tensors[0].shape, dtype=acc_dtype, device=tensors[0].device)
    denominator = torch.zeros_like(numerator)
    all_below = torch.ones(tensors[0].shape, dtype=torch.bool, device=tensors[0].device)
    scales = fisher_scales or [1.0] * len(tensors)
    for lam, theta, fisher, scale in zip(coefficients.tolist(), tensors, fishers, scales):
        if not lam:
            continue
        weight = fisher.to(acc_dtype) * scale
        all_below &= weight < floor
        weight.mul_(lam)
        denominator.add_(weight)
        numerator.addcmul_(weight, theta.to(acc_dtype))
    merged = numerator.div_(denominator.clamp_(min=torch.finfo(acc_dtype).tiny))
    if all_below.any():
        if fallback == TARGET:
            replacement = tensors[target].to(acc_dtype)
        else:
            replacement = isotropic_merge(tensors, coefficients).to(acc_dtype)
        merged = torch.where(all_below, replacement, merged)
    return merged.to(tensors[0].dtype)


def fisher_global_norm(fisher: dict[str, torch.Tensor]) -> float:
    """``‖F‖₂`` over every entry of one model's Fisher (for ``normalize=True``)."""
    total = sum(float(f.double().pow(2).sum()) for f in fisher.values())
    if total <= 0:
        raise ValueError("the Fisher is zero everywhere: it cannot be normalized")
    return total**0.5
