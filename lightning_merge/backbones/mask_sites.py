"""What a backbone family says about its own layout for the Fisher engines: where its mask nodes sit
(paper 003 §3: one mask per attention head and per FFN unit), and which parameters are added to a
module's output rather than used by a layer (a ViT's position embedding and class token)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

HEADS, FFN = "heads", "ffn"


@dataclass(frozen=True)
class AddedParameter:
    """A parameter added to the output of ``module`` at its first ``tokens`` positions (all positions
    when ``None``): an example's gradient of it is that output's gradient there, so the per-example
    Fisher engine reads it from there (timm's ``pos_embed`` and ``cls_token`` before ``pos_drop``)."""

    module: str
    parameter: str
    tokens: int | None = None


@dataclass
class MaskSite:
    """Where one layer's masks act, and which parameters they stand for.

    ``module`` is hooked on its output (``pre=False``) or on its input (``pre=True``); the activation's
    last dimension is ``units`` (FFN) or ``units × head_dim`` (heads). ``qk``/``v`` are
    ``(parameter base name, first row)`` pairs (fused QKV layers share a base with different rows),
    ``out`` the base name of the layer that reads the masked activation. ``columns``: those layers store
    their weight as ``(in, out)`` (GPT-2's ``Conv1D``), so an output unit is a column, not a row.
    """

    name: str
    kind: str
    units: int
    module: nn.Module = field(repr=False)
    pre: bool = False
    head_dim: int = 1
    qk: list[tuple[str, int]] = field(default_factory=list)
    v: tuple[str, int] | None = None
    gated: str | None = None  # FFN: the first FFN layer, whose rows the masks gate
    out: str | None = None
    columns: bool = False

    def layout(self) -> dict:
        """JSON-able description stored with the mask Fisher (no module)."""
        return {k: getattr(self, k) for k in ("kind", "units", "head_dim", "qk", "v", "gated", "out", "columns")}

    def apply(self, activation: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Multiply ``activation (B, T, units·head_dim)`` by ``mask (B, units)``."""
        shape = activation.shape
        gated = activation.reshape(*shape[:-1], self.units, self.head_dim)
        mask = mask.to(activation.dtype).reshape(shape[0], *([1] * (len(shape) - 2)), self.units, 1)
        return (gated * mask).reshape(shape)
