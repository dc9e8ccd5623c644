"""Work only on token rows that carry gradient: a Fisher backward pass has many exact zeros.

An output gradient row is exactly zero at every padded position (a masked key gets probability 0,
so nothing flows back into it) and, in the last layer of a classifier that reads one token ([CLS]),
at every other position too. A product with such a row contributes exactly nothing, both to a
per-example weight gradient ``Σ_t g_t x_tᵀ`` and to the input gradient ``g W``. The Fisher engines
skip those rows on CPU; on an accelerator one dense product costs less than the host sync that
finding the rows needs, so nothing changes there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Skip rows only when the rows kept are fewer than this share of all rows.
SKIP_ROWS_BELOW = 0.9


def _skipping_pays(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dim() >= 2


def active_rows(rows: torch.Tensor) -> torch.Tensor:
    """Boolean ``(R,)``: which rows of ``rows (R, D)`` hold a non-zero (a NaN row counts as non-zero)."""
    return (rows.amax(-1) != 0) | (rows.amin(-1) != 0)


def active_prefix_lengths(g: torch.Tensor) -> list[int] | None:
    """Per example, how many leading rows of ``g (B, T, D)`` hold all its non-zero rows, or ``None``
    when skipping would not pay (an accelerator, one row per example, or few zero rows)."""
    if not _skipping_pays(g) or g.shape[1] < 2:
        return None
    positions = torch.arange(1, g.shape[1] + 1, device=g.device)
    lengths = (active_rows(g.reshape(-1, g.shape[-1])).view(g.shape[:2]) * positions).amax(1).tolist()
    return lengths if sum(lengths) < SKIP_ROWS_BELOW * g.shape[0] * g.shape[1] else None


class _FrozenLinear(torch.autograd.Function):
    """``x Wᵀ + b`` for a frozen layer, whose input gradient ``g W`` is computed on non-zero rows of
    ``g`` only (the rest of it is exactly zero either way)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        weight = weight.to(rows.dtype)
        active = active_rows(rows).nonzero().squeeze(1) if _skipping_pays(rows) else None
        if active is None or active.numel() >= SKIP_ROWS_BELOW * rows.shape[0]:
            return (grad @ weight).to(ctx.input_dtype), None, None
        out = rows.new_zeros(rows.shape[0], weight.shape[1], dtype=ctx.input_dtype)
        out.index_copy_(0, active, (rows.index_select(0, active) @ weight).to(ctx.input_dtype))
        return out.view(*grad.shape[:-1], weight.shape[1]), None, None


def freeze(model: nn.Module) -> Callable[[], None]:
    """Freeze every trainable parameter of ``model`` (the Fisher engines differentiate activations or
    masks only, so autograd does no weight-gradient work) and route its plain ``nn.Linear`` layers
    through :class:`_FrozenLinear` (forward hooks still run: only ``forward`` is replaced). Returns the
    undo, which restores both."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    patched = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)]
    for module in patched:
        module.forward = lambda x, m=module: _FrozenLinear.apply(x, m.weight, m.bias)

    def undo() -> None:
        for module in patched:
            del module.forward
        for p in trainable:
            p.requires_grad_(True)
    return undo
