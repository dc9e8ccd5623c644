"""In-memory merging for coefficient searches: every model as one flat buffer, so each candidate ``λ``
is a single cache-blocked pass over memory (:mod:`lightning_merge.merging.formulas`), not hundreds of
small per-tensor op chains."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_merge.merging.formulas import normalize_coefficients
from lightning_merge.merging.methods import MergeMethod


class FlatLayout:
    """Where each named tensor lives in a flat buffer."""

    def __init__(self, shapes: Mapping[str, torch.Size]) -> None:
        self.names = list(shapes)
        self.shapes = {n: torch.Size(s) for n, s in shapes.items()}
        self.offsets, total = {}, 0
        for name in self.names:
            self.offsets[name] = total
            total += self.shapes[name].numel()
        self.numel = total

    def flatten(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat = torch.empty(self.numel, dtype=dtype)
        for name, view in self.unflatten(flat).items():
            view.copy_(tensors[name])
        return flat

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: flat[self.offsets[n]:self.offsets[n] + self.shapes[n].numel()].view(self.shapes[n])
                for n in self.names}


class FlatMerger:
    """``method`` bound to M models' flat parameter buffers ``thetas`` (laid out by ``layout``);
    ``merger(λ)`` returns the merged tensors as views of one output buffer, overwritten by the next call.
    Several methods can share the same ``thetas`` and, when their results are used one at a time, the
    same ``out`` buffer."""

    def __init__(self, method: MergeMethod, thetas: Sequence[torch.Tensor], layout: FlatLayout,
                 weights: Sequence[Mapping[str, torch.Tensor]] | None = None, target: int = 0,
                 out: torch.Tensor | None = None) -> None:
        if method.fisher_field is not None and weights is None:
            raise ValueError(f"{method.name} needs per-model Fishers")
        self.method, self.target, self.layout, self.thetas = method, target, layout, list(thetas)
        self.weights = None if method.fisher_field is None else [layout.flatten(w) for w in weights]
        self.scales = method.scales(weights) if self.weights is not None else None
        self.out = torch.empty(layout.numel, dtype=torch.float32) if out is None else out

    @classmethod
    def from_states(cls, method: MergeMethod, states: Sequence[Mapping[str, torch.Tensor]],
                    shapes: Mapping[str, torch.Size], weights=None, target: int = 0) -> FlatMerger:
        layout = FlatLayout(shapes)
        return cls(method, [layout.flatten(s) for s in states], layout, weights, target)

    def to(self, device: torch.device | str) -> FlatMerger:
        self.thetas = [t.to(device) for t in self.thetas]
        self.weights = None if self.weights is None else [w.to(device) for w in self.weights]
        self.out = self.out.to(device)
        return self

    def __call__(self, coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
        lam = normalize_coefficients(coefficients, len(self.thetas))
        self.method.merge_tensor(self.thetas, self.weights, lam, self.target, self.scales, out=self.out)
        return self.layout.unflatten(self.out)
