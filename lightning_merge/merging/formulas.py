"""The merge formulas on plain tensors (no Lightning, no files).

* isotropic merge (NeurIPS paper §2.2): ``θ* = Σ_i λ_i θ_i``;
* Fisher merge (eq. 4): ``θ*_j = Σ_i λ_i F_i,j θ_i,j / Σ_i λ_i F_i,j`` with ``λ_i ≥ 0``, ``Σ λ_i = 1``;
  mask-node Fisher merging (paper 003 §3, eq. 5) is the same formula fed expanded mask Fishers.
* Fisher floor (§2.4 / reference implementation): where every Fisher that takes part (``λ_i > 0``)
  is below ``floor``, eq. 4 is numerically meaningless; the result there falls back to the target
  model's value (``fallback="target"``) or to the isotropic average (``fallback="isotropic"``).

Both formulas work through the tensors in chunks that fit in cache, so the temporaries of eq. 4 never
travel to main memory: the merge costs about one read of the inputs and one write of the output.
Only plain element-wise ops are used (no fused multiply-add), so the result of every element is the
same whatever the chunking: a merge streamed from files equals one done in memory, bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TARGET, ISOTROPIC = "target", "isotropic"
CPU_CHUNK = 1 << 17  # elements; 512 KiB per fp32 temporary, several of which must stay in cache


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


def _chunks(numel: int, device: torch.device):
    # On accelerators one launch per op over the whole tensor is already memory bound.
    step = CPU_CHUNK if device.type == "cpu" else max(numel, 1)
    for start in range(0, numel, step):
        yield slice(start, min(start + step, numel))


def _prepare(tensors: Sequence[torch.Tensor], coefficients: torch.Tensor, out: torch.Tensor | None):
    lam = coefficients.tolist()
    active = [i for i, c in enumerate(lam) if c]
    if out is None:
        out = torch.empty_like(tensors[0])
    return lam, active, out


def isotropic_merge(tensors: Sequence[torch.Tensor], coefficients: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_i λ_i θ_i`` (NeurIPS paper §2.2), computed in float32 or wider, returned in θ's dtype.

    Models with ``λ_i = 0`` are skipped, so ``λ = (1, 0, …)`` returns model 0 exactly.
    """
    lam, active, out = _prepare(tensors, coefficients, out)
    if len(active) == 1:
        return out.copy_(tensors[active[0]])
    acc = torch.promote_types(tensors[0].dtype, torch.float32)
    flat = [t.reshape(-1) for t in tensors]
    for sl in _chunks(out.numel(), out.device):
        out.view(-1)[sl].copy_(_isotropic_chunk(flat, lam, active, sl, acc))
    return out


def _isotropic_chunk(flat, lam, active, sl, acc) -> torch.Tensor:
    total = flat[active[0]][sl].to(acc) * lam[active[0]]
    for i in active[1:]:
        total += flat[i][sl].to(acc) * lam[i]
    return total


def fisher_merge(tensors: Sequence[torch.Tensor], fishers: Sequence[torch.Tensor], coefficients: torch.Tensor,
                 floor: float = 1e-6, fallback: str = TARGET, target: int = 0,
                 fisher_scales: Sequence[float] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 4 for one tensor. ``fisher_scales[i]`` multiplies model i's Fisher (e.g. ``1/‖F_i‖₂`` when
    normalizing each Fisher to unit norm, as the reference implementation offers); the floor applies
    to the scaled Fisher. Models with ``λ_i = 0`` take no part, so ``λ = (1, 0, …)`` is model 0 exactly."""
    if fallback not in (TARGET, ISOTROPIC):
        raise ValueError(f"Unknown Fisher fallback {fallback!r}; choose {TARGET!r} or {ISOTROPIC!r}")
    lam, active, out = _prepare(tensors, coefficients, out)
    if len(active) == 1:
        return out.copy_(tensors[active[0]])
    scales = list(fisher_scales) if fisher_scales is not None else [1.0] * len(tensors)
    acc = torch.promote_types(tensors[0].dtype, torch.float32)
    tiny = torch.finfo(acc).tiny
    thetas = [t.reshape(-1) for t in tensors]
    flat_f = [f.reshape(-1) for f in fishers]
    for sl in _chunks(out.numel(), out.device):
        first = active[0]
        f = flat_f[first][sl]
        den = f.to(acc) * (lam[first] * scales[first])
        num = den * thetas[first][sl].to(acc)
        below = f < floor / scales[first]
        for i in active[1:]:
            f = flat_f[i][sl]
            weight = f.to(acc) * (lam[i] * scales[i])
            den += weight
            weight *= thetas[i][sl].to(acc)
            num += weight
            below &= f < floor / scales[i]
        num /= den.clamp_(min=tiny)
        if below.any():
            if fallback == TARGET:
                replacement = thetas[target][sl].to(acc)
            else:
                replacement = _isotropic_chunk(thetas, lam, active, sl, acc)
            num = torch.where(below, replacement, num)
        out.view(-1)[sl].copy_(num)
    return out


def fisher_global_norm(fisher: dict[str, torch.Tensor]) -> float:
    """``‖F‖₂`` over every entry of one model's Fisher (for ``normalize=True``)."""
    total = sum(float(f.double().pow(2).sum()) for f in fisher.values())
    if total <= 0:
        raise ValueError("the Fisher is zero everywhere: it cannot be normalized")
    return total**0.5
