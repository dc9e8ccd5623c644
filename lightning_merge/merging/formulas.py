"""The merge formulas on plain tensors (no Lightning, no files).

* isotropic merge (NeurIPS paper §2.2): ``θ* = Σ_i λ_i θ_i``;
* Fisher merge (eq. 4): ``θ*_j = Σ_i λ_i F_i,j θ_i,j / Σ_i λ_i F_i,j`` with ``λ_i ≥ 0``, ``Σ λ_i = 1``;
  mask-node Fisher merging (paper 003 §3, eq. 5) is the same formula fed expanded mask Fishers.
* Fisher floor (§2.4 / reference implementation): where every Fisher that takes part (``λ_i > 0``)
  is below ``floor``, eq. 4 is numerically meaningless; the result there falls back to the target
  model's value (``fallback="target"``) or to the isotropic average (``fallback="isotropic"``).

Both formulas work through the tensors in chunks that fit in cache, so the temporaries of eq. 4 never
travel to main memory (``benchmarks/merge_speed.py``: 1.9–2.3× the time of one read of the inputs and
one write of the output, for two 110M-parameter models).
Only plain element-wise ops are used (no fused multiply-add), so the result of every element is the
same whatever the chunking: a merge streamed from files equals one done in memory, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

TARGET, ISOTROPIC = "target", "isotropic"
CPU_CHUNK = 1 << 19  # elements; 2 MiB per fp32 temporary: the few of them stay in cache


def check_coefficients(coefficients: Sequence[float], num_models: int, normalize: bool = True) -> list[float]:
    """``λ``: one per model, finite, ≥ 0, not all zero; scaled to sum 1 when ``normalize`` (the convex
    weights of an average; task-vector scales are used as given)."""
    lam = [float(c) for c in coefficients]
    if len(lam) != num_models:
        raise ValueError(f"{len(lam)} merging coefficients for {num_models} models")
    if not all(math.isfinite(c) and c >= 0 for c in lam):
        raise ValueError(f"merging coefficients must be finite and >= 0, got {lam}")
    if sum(lam) <= 0:
        raise ValueError("merging coefficients are all zero")
    if normalize:
        total = math.fsum(lam)
        lam = [c / total for c in lam]
    return lam


def normalize_coefficients(coefficients: Sequence[float], num_models: int) -> torch.Tensor:
    """:func:`check_coefficients` as a float64 tensor summing to 1."""
    return torch.tensor(check_coefficients(coefficients, num_models), dtype=torch.float64)


class Workspace:
    """Named buffers reused across calls (a merge calls a kernel once per piece): no allocation, and so no
    page faults, inside the merge loop. Views of the buffers are handed out; a larger request regrows."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < n or buffer.dtype != dtype or buffer.device != torch.device(
                device or "cpu"):
            buffer = self.buffers[name] = torch.empty(max(n, 1), dtype=dtype, device=device)
        return buffer[:n]


def _chunks(numel: int, device: torch.device):
    # On accelerators one launch per op over the whole tensor is already memory bound.
    step = CPU_CHUNK if device.type == "cpu" else max(numel, 1)
    for start in range(0, numel, step):
        yield slice(start, min(start + step, numel))


def _prepare(tensors: Sequence[torch.Tensor], coefficients: torch.Tensor | Sequence[float], out: torch.Tensor | None):
    lam = coefficients.tolist() if isinstance(coefficients, torch.Tensor) else [float(c) for c in coefficients]
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
                 fisher_scales: Sequence[float] | None = None, out: torch.Tensor | None = None,
                 workspace: Workspace | None = None) -> torch.Tensor:
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
    weight_of = {i: lam[i] * scales[i] for i in active}
    threshold = {i: floor / scales[i] for i in active}
    thetas = [t.reshape(-1) for t in tensors]
    flat_f = [f.reshape(-1) for f in fishers]
    flat_out = out.view(-1)
    step = min(CPU_CHUNK, out.numel()) if out.device.type == "cpu" else out.numel()
    # One workspace for all chunks: no allocation (and no page faults) inside the loop.
    workspace = workspace or Workspace()
    num, den, weight, mask = (workspace.get(k, step, acc, out.device) for k in ("num", "den", "weight", "mask"))
    as_acc = (lambda x: x) if tensors[0].dtype == acc and fishers[0].dtype == acc else (lambda x: x.to(acc))
    tiny = torch.finfo(acc).tiny
    for sl in _chunks(out.numel(), out.device):
        m = sl.stop - sl.start
        n_, d_, w_, k_ = num[:m], den[:m], weight[:m], mask[:m]
        first, *rest = active
        torch.mul(as_acc(flat_f[first][sl]), weight_of[first], out=d_)
        torch.mul(d_, as_acc(thetas[first][sl]), out=n_)
        for i in rest:
            torch.mul(as_acc(flat_f[i][sl]), weight_of[i], out=w_)
            d_.add_(w_)
            w_.mul_(as_acc(thetas[i][sl]))
            n_.add_(w_)
        # Where every Fisher is below the floor: a 0/1 mask, built only when each model's smallest
        # Fisher in the chunk is below it (float ops only: boolean kernels are several times slower).
        fallback_here = all(float(flat_f[i][sl].min()) < threshold[i] for i in active)
        if fallback_here:
            torch.lt(flat_f[first][sl], threshold[first], out=k_)
            for i in rest:
                torch.lt(flat_f[i][sl], threshold[i], out=w_)
                k_.mul_(w_)
            fallback_here = float(k_.max()) > 0
        if fallback_here:
            d_.clamp_(min=tiny)  # keep the masked-out quotients finite (0/0 would poison the blend)
        # Straight into the output when it has the working precision (one pass less).
        result = flat_out[sl] if out.dtype == acc else n_
        torch.div(n_, d_, out=result)
        if fallback_here:
            if fallback == TARGET:
                replacement = as_acc(thetas[target][sl])
            else:
                replacement = _isotropic_chunk(thetas, lam, active, sl, acc)
            # result·(1−k) + replacement·k with k ∈ {0, 1}: exactly one of the two, finite values only.
            torch.sub(1.0, k_, out=w_)
            result.mul_(w_)
            torch.mul(replacement, k_, out=w_)
            result.add_(w_)
        if result is not flat_out[sl]:
            flat_out[sl].copy_(result)
    return out


