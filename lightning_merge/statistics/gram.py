"""Gram matrices of linear layers' inputs, the statistics RegMean merges with (Jin et al., ICLR 2023,
*Dataless Knowledge Fusion by Merging Weights of Language Models*, §3: ``G = Xᵀ X`` of a layer's input
``X``, one row per token).

Forward pre-hooks on every body ``nn.Linear`` add ``Σ x xᵀ`` of the
layer's input over the batch's *real* tokens: rows at padded positions (``attention_mask == 0``) are
left out, so the same examples padded to any length give the same Gram. Layers that read the very
same input tensor one after another (BERT's query, key and value; any fan-out of one activation) share
one Gram, stored once under the first layer's name. Sums only: nothing is divided, so Grams of
several processes or files add up.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn


def linear_layers(model: nn.Module, is_head=lambda name: False,
                  transposed_linear: tuple[type, ...] = ()) -> dict[str, nn.Module]:
    """The layers RegMean merges: every ``nn.Linear`` outside the task head, by module name, and every
    layer of the ``transposed_linear`` types (GPT-2's ``Conv1D``, weight stored ``in × out``)."""
    kinds = (nn.Linear, *transposed_linear)
    return {name: module for name, module in model.named_modules()
            if isinstance(module, kinds) and not is_head(f"{name}.weight")}


class GramAccumulator:
    """``Σ x xᵀ`` of each layer's input rows, in ``dtype`` (float32, or float64 for long runs).

    Use ``with accumulator.capture(real)`` around a forward pass, ``real`` the batch's ``(B, T)``
    attention mask (``None``: every position is real, as in a ViT). ``sums`` maps each Gram's key (the
    first layer reading that input) to its sum (complete once :meth:`detach` ran), ``rows`` to how many
    rows it summed, and ``shared`` maps every layer to its Gram's key.
    """

    def __init__(self, layers: Mapping[str, nn.Module], dtype: torch.dtype = torch.float32) -> None:
        self.layers, self.dtype = dict(layers), dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.shared: dict[str, str] = {}
        self._real: torch.Tensor | None = None
        self._capturing = False
        self._previous: tuple[torch.Tensor, str] | None = None
        self._seen: dict[str, str] = {}
        self._handles = [layer.register_forward_pre_hook(partial(self._hook, name))
                         for name, layer in self.layers.items()]

    @contextmanager
    def capture(self, real: torch.Tensor | None) -> Iterator[None]:
        self._real = None if real is None else real.bool()
        self._capturing, self._previous, self._seen = True, None, {}
        try:
            yield
        finally:
            self._capturing, self._previous, self._real = False, None, None
        self._check_sharing()

    def _check_sharing(self) -> None:
        missing = [n for n in self.layers if n not in self._seen]
        if missing:
            raise RuntimeError(f"layers {missing[:5]} did not run in the forward pass: their Gram would be empty")
        if not self.shared:
            self.shared = dict(self._seen)
        elif self._seen != self.shared:  # the same model must share inputs the same way in every batch
            raise RuntimeError("layers shared their inputs differently in two batches; Grams cannot be keyed")

    def _rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1]
        real = self._real
        if real is None or x.dim() == 2:  # no padding, or one row per example (a pooler's first token)
            return x.reshape(-1, d)
        if tuple(x.shape[:-1]) != tuple(real.shape):
            raise ValueError(f"layer {name!r} reads an input of shape {tuple(x.shape)} that the attention mask "
                             f"{tuple(real.shape)} does not describe: cannot tell its padded rows")
        return x[real]

    def _hook(self, name: str, module: nn.Module, args: tuple) -> None:
        if not self._capturing:
            return
        if name in self._seen:
            raise RuntimeError(f"layer {name!r} ran twice in one forward pass; shared modules are not supported")
        x = args[0]
        if self._previous is not None and x is self._previous[0]:
            self._seen[name] = self._previous[1]
            return
        rows = self._rows(name, x.detach()).to(self.dtype)
        total = self.sums.get(name)
        if total is None:
            total = self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype, device=rows.device)
            self.rows[name] = 0
        _add_upper(total, rows)
        self.rows[name] += rows.shape[0]
        self._seen[name] = name
        self._previous = (x, name)

    def detach(self) -> None:
        """Remove the hooks and complete every Gram from its upper triangle."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for key, total in self.sums.items():  # a new tensor: the sums may be inference tensors
            self.sums[key] = torch.triu(total) + torch.triu(total, 1).T


# A Gram update is cut into at most 6 block-rows of at least BLOCK rows each. Timed here (one-off, 1045
# real rows, as a MiniLM batch of 16 at seq 128 has): 384 wide 1.57 ms whole, 1.09 ms in 6 blocks;
# 1536 wide 24.5 ms whole, 15.4 ms in 6, 15.6 in 8 (smaller products run slower than they save).
BLOCK = 64


def upper_blocks(d: int) -> list[tuple[int, int]]:
    """The block-rows ``[start, stop)`` of a ``d``-wide Gram that :func:`_add_upper` updates."""
    blocks = max(1, min(6, d // BLOCK))
    edges = [d * i // blocks for i in range(blocks + 1)]
    return list(zip(edges[:-1], edges[1:]))


def gram_update_flops(d: int) -> int:
    """Floating-point operations per input row of :func:`_add_upper` for a ``d``-wide Gram."""
    return sum(2 * (stop - start) * (d - start) for start, stop in upper_blocks(d))


def _add_upper(total: torch.Tensor, rows: torch.Tensor) -> None:
    """``total += rowsᵀ rows`` on and above the diagonal only (block-rows ``i``, columns ``i…``): about
    (k+1)/2k of the full product's work for k block-rows; :meth:`GramAccumulator.detach` mirrors it."""
    for start, stop in upper_blocks(rows.shape[1]):
        total[start:stop, start:].addmm_(rows[:, start:stop].T, rows[:, start:])


def weight_keys(layers: Mapping[str, nn.Module], shared: Mapping[str, str]) -> dict[str, str]:
    """Weight parameter name -> the key of the Gram of its layer's input (the header's ``gram_keys``)."""
    return {f"{name}.weight": shared[name] for name in layers}
