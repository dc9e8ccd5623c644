"""In-memory merging for coefficient searches: every model as one flat buffer, each candidate ``λ`` a
pass of the merge driver over views of those buffers (no copies), into one output buffer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_merge.merging.base import MergeMethod
from lightning_merge.merging.driver import CHUNK, MergePlan
from lightning_merge.merging.tensors import MemoryTensors


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
    """``method`` bound to M models' flat buffers ``thetas`` (laid out by ``layout``) and the inputs it
    declares (per-model ``inputs``: statistics files or tensors; ``shared``: flat buffers, e.g. ``base``);
    ``merger(λ)`` returns the merged tensors as views of one output buffer, overwritten by the next call.
    Several methods can share the same ``thetas`` and ``out`` when their results are used one at a time.

    ``states`` (each model's full parameters, head included) let statistics files be checked against
    the model they were estimated on; without them that check is skipped.
    """

    def __init__(self, method: MergeMethod, thetas: Sequence[torch.Tensor], layout: FlatLayout,
                 inputs: Mapping[str, Sequence] | None = None, shared: Mapping[str, torch.Tensor] | None = None,
                 target: int = 0, out: torch.Tensor | None = None,
                 states: Sequence[Mapping[str, torch.Tensor]] | None = None,
                 check_provenance: bool | Sequence[bool] = True, chunk: int = CHUNK,
                 labels: Sequence[str] | None = None) -> None:
        self.method, self.layout, self.target = method, layout, target
        self.thetas, self.shared = list(thetas), dict(shared or {})
        self.out = torch.empty(layout.numel, dtype=torch.float32) if out is None else out
        labels = labels or [f"model {i}" for i in range(len(self.thetas))]
        models = [MemoryTensors({**(states[i] if states else {}), **layout.unflatten(t)}, labels[i])
                  for i, t in enumerate(self.thetas)]
        self.plan = MergePlan(method, models, layout.names, inputs=inputs, target=target, in_memory=True,
                              shared={k: MemoryTensors(layout.unflatten(v), k) for k, v in self.shared.items()},
                              check_provenance=check_provenance if states is not None else False, chunk=chunk)

    @classmethod
    def from_states(cls, method: MergeMethod, states: Sequence[Mapping[str, torch.Tensor]],
                    shapes: Mapping[str, torch.Size], inputs=None, shared=None, target: int = 0,
                    chunk: int = CHUNK) -> FlatMerger:
        layout = FlatLayout(shapes)
        return cls(method, [layout.flatten(s) for s in states], layout, inputs,
                   {k: layout.flatten(v) for k, v in (shared or {}).items()}, target, chunk=chunk)

    def to(self, device: torch.device | str) -> FlatMerger:
        """Move every buffer the merges read and write (models, shared and per-model inputs, output)."""
        self.thetas = [t.to(device) for t in self.thetas]
        self.shared = {k: v.to(device) for k, v in self.shared.items()}
        self.out = self.out.to(device)
        self.plan.models = [MemoryTensors(self.layout.unflatten(t), m.label)
                            for t, m in zip(self.thetas, self.plan.models)]
        self.plan.shared = {k: MemoryTensors(self.layout.unflatten(v), k) for k, v in self.shared.items()}
        for readers in self.plan.inputs.values():
            for reader in readers:
                reader.to(device)
        return self

    def __call__(self, coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
        flat = {n: v.view(-1) for n, v in self.layout.unflatten(self.out).items()}
        self.plan.run(coefficients, lambda name, a, b: flat[name][a:b])
        return self.layout.unflatten(self.out)
