"""Mask-node Fisher (paper 003, §3): one mask per attention head and per FFN intermediate unit.

Masks of ones multiply the per-head attention context and the FFN intermediate activations; they
never change the model's output while they are 1, and the Fisher of each mask (003, eq. 4) is a cheap
stand-in for the Fisher of the parameters it gates. Masks are applied with hooks on the model's own
modules (transformers 5 has no ``head_mask``). Each example gets its own copy of the masks, so
``autograd.grad`` with respect to them returns per-example gradients directly.

The compact result (``H`` or ``D`` numbers per layer) is expanded to parameter shapes only when
merging, by :func:`expand_mask_fisher`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_merge.backbones.mask_sites import HEADS, MaskSite
from lightning_merge.fisher.zero_rows import freeze

PAPER, RELEASED = "paper", "released"


class _TimesOnes(torch.autograd.Function):
    """``activation × mask`` for a mask of ones, the point where the mask Fisher is taken: the product is
    the activation itself, so nothing is multiplied and the activation's gradient passes through as it
    is; the mask's gradient is ``Σ_{t,d} g·a`` per example and unit (``d`` within a head)."""

    @staticmethod
    def forward(ctx, activation, mask, units, head_dim):
        ctx.save_for_backward(activation)
        ctx.units, ctx.head_dim = units, head_dim
        return activation.view_as(activation)

    @staticmethod
    def backward(ctx, grad):
        (activation,) = ctx.saved_tensors
        per_unit = (grad * activation).reshape(activation.shape[0], -1, ctx.units, ctx.head_dim).sum((1, 3))
        return grad, per_unit, None, None


class MaskHooks:
    """Installs the masks of ``sites``; ``masks[name]`` is a ``(B, units)`` tensor set per batch.

    ``of_ones=True`` promises that every mask is all ones (as the mask Fisher engine's are): the masks
    then act through :class:`_TimesOnes`, which skips the multiplications, and any other value is
    ignored. Masks of other values (pruning, tests) need the default."""

    def __init__(self, sites: list[MaskSite], of_ones: bool = False) -> None:
        self.sites = sites
        self.of_ones = of_ones
        self.masks: dict[str, torch.Tensor] = {}
        self._handles = []

    def _apply(self, site: MaskSite, activation: torch.Tensor) -> torch.Tensor:
        mask = self.masks[site.name]
        if self.of_ones:
            return _TimesOnes.apply(activation, mask, site.units, site.head_dim)
        return site.apply(activation, mask)

    def ones(self, batch_size: int, device, requires_grad: bool = True) -> dict[str, torch.Tensor]:
        self.masks = {s.name: torch.ones(batch_size, s.units, device=device, requires_grad=requires_grad)
                      for s in self.sites}
        return self.masks

    def install(self) -> None:
        for site in self.sites:
            if site.pre:
                def pre_hook(module, args, site=site):
                    return (self._apply(site, args[0]), *args[1:]) if site.name in self.masks else None
                self._handles.append(site.module.register_forward_pre_hook(pre_hook))
            else:
                def hook(module, args, output, site=site):
                    if site.name not in self.masks:
                        return None
                    if isinstance(output, tuple):
                        return (self._apply(site, output[0]), *output[1:])
                    return self._apply(site, output)
                self._handles.append(site.module.register_forward_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.masks = {}

    @contextmanager
    def installed(self) -> Iterator[MaskHooks]:
        self.install()
        try:
            yield self
        finally:
            self.remove()


class MaskFisherEngine:
    """Accumulates ``Σ_examples Σ_directions (∂(z·v)/∂m)²`` for every mask of ``sites`` (003 eq. 4,
    before dividing by N). Same interface as
    :class:`~lightning_merge.fisher.per_example.PerExampleSquaredGradients`: ``capture``,
    ``accumulate``, ``sums``, ``detach``. Parameters are frozen while attached (only the masks need
    gradients, so no weight-gradient work is done) and restored by :meth:`detach`.
    """

    def __init__(self, model: nn.Module, sites: list[MaskSite]) -> None:
        device = next(model.parameters()).device
        self.hooks = MaskHooks(sites, of_ones=True)
        self.sums = {s.name: torch.zeros(s.units, device=device) for s in sites}
        self._device = device
        self._unfreeze = freeze(model)
        self.hooks.install()

    @contextmanager
    def capture(self, batch_size: int) -> Iterator[None]:
        with torch.enable_grad():
            self.hooks.ones(batch_size, self._device)
            yield

    def accumulate(self, logits: torch.Tensor, directions: torch.Tensor) -> None:
        names = list(self.hooks.masks)
        masks = [self.hooks.masks[n] for n in names]
        for k in range(directions.shape[0]):
            grads = torch.autograd.grad(logits, masks, grad_outputs=directions[k],
                                        retain_graph=k < directions.shape[0] - 1)
            for name, g in zip(names, grads):
                self.sums[name].add_(g.float().square().sum(0))

    def detach(self) -> None:
        self.hooks.remove()
        self._unfreeze()


def expand_mask_fisher(mask_fisher: dict[str, torch.Tensor], layout: dict[str, dict],
                       shapes: dict[str, torch.Size], rule: str = PAPER) -> dict[str, torch.Tensor]:
    """Per-parameter weights from mask Fishers (003 §3), for the parameters named in ``shapes``.

    ``paper`` (003 §3, rules 1–3): rows of the query and key projections of head ``h`` ← that head's
    mask Fisher; row ``r`` (and bias ``r``) of the first FFN layer ← FFN mask ``r``; everything else 1
    (plain averaging there).
    ``released`` (the authors' code): as ``paper``, plus value projection and attention output ← the
    layer's mean head Fisher, the second FFN layer ← the layer's mean FFN Fisher, and every other
    parameter (embeddings, pooler, LayerNorms) ← the global mean of all mask Fishers.
    """
    if rule not in (PAPER, RELEASED):
        raise ValueError(f"Unknown mask-to-parameter rule {rule!r}; choose {PAPER!r} or {RELEASED!r}")
    missing = [n for n in layout if n not in mask_fisher]
    if missing:
        raise KeyError(f"mask Fisher has no entry for sites {missing[:4]}")
    fill = 1.0
    if rule == RELEASED:
        fill = torch.cat([mask_fisher[n].flatten() for n in layout]).mean().item()
    weights = {name: torch.full(shape, fill) for name, shape in shapes.items()}

    def set_rows(base: str, first_row: int, per_row: torch.Tensor, columns: bool = False) -> None:
        for suffix in (".weight", ".bias"):
            if base + suffix in weights:
                w = weights[base + suffix]
                if columns and w.dim() == 2:  # (in, out) storage: output unit r is column r
                    w = w.T
                rows = per_row.reshape(-1, *([1] * (w.dim() - 1))).expand(-1, *w.shape[1:])
                w[first_row:first_row + len(per_row)] = rows

    def set_all(base: str | None, value: float) -> None:
        for suffix in (".weight", ".bias"):
            if base is not None and base + suffix in weights:
                weights[base + suffix].fill_(value)

    for name, site in layout.items():
        f = mask_fisher[name].float()
        columns = site.get("columns", False)  # files written before GPT-2 support lack the key
        if site["kind"] == HEADS:
            per_row = f.repeat_interleave(site["head_dim"])
            if rule == RELEASED:
                if site["v"] is not None:
                    set_rows(site["v"][0], site["v"][1], torch.full_like(per_row, f.mean().item()), columns)
                set_all(site["out"], f.mean().item())
            for base, first_row in site["qk"]:
                set_rows(base, first_row, per_row, columns)
        else:
            if rule == RELEASED:
                set_all(site["out"], f.mean().item())
            set_rows(site["gated"], 0, f, columns)
    return weights
