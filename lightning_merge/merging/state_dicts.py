"""Merging whole models' bodies, state dicts in and out. Task heads are never merged: each task keeps
its own."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from lightning_merge.merging.base import MergeMethod
from lightning_merge.merging.driver import MergePlan, merged_state
from lightning_merge.merging.tensors import MemoryTensors


def shared_body_names(states: Sequence[Mapping[str, torch.Tensor]], head_names: set[str] = frozenset()) -> list[str]:
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


def merge_state_dicts(method: MergeMethod, states: Sequence[Mapping[str, torch.Tensor]],
                      coefficients: Sequence[float], inputs: Mapping[str, Sequence] | None = None,
                      shared: Mapping[str, Mapping[str, torch.Tensor]] | None = None, *,
                      head_names: set[str] = frozenset(), target: int = 0) -> dict[str, torch.Tensor]:
    """Merge the shared bodies of ``states`` with ``method``: ``inputs`` are its per-model inputs (state
    dicts or statistics files, one per model), ``shared`` its shared ones (e.g. ``base``: a state dict)."""
    names = shared_body_names(states, head_names)
    models = [MemoryTensors(s, f"model {i}") for i, s in enumerate(states)]
    plan = MergePlan(method, models, names, inputs=inputs, target=target, check_provenance=False,
                     shared={k: MemoryTensors(v, k) for k, v in (shared or {}).items()})
    try:
        return merged_state(plan, coefficients)
    finally:
        plan.close()


def merge_bodies(states: Sequence[Mapping[str, torch.Tensor]], coefficients: Sequence[float],
                 fishers: Sequence[Mapping[str, torch.Tensor]] | None = None, *, head_names: set[str] = frozenset(),
                 floor: float = 1e-6, fallback: str = "target", target: int = 0,
                 normalize: bool = False) -> dict[str, torch.Tensor]:
    """Isotropic merge of the shared bodies without ``fishers``, eq. 4 with them."""
    from lightning_merge.merging.methods import FisherMerge, IsotropicMerge

    if fishers is None:
        return merge_state_dicts(IsotropicMerge(), states, coefficients, head_names=head_names, target=target)
    method = FisherMerge(floor=floor, fallback=fallback, normalize=normalize)
    return merge_state_dicts(method, states, coefficients, {"fisher": list(fishers)}, head_names=head_names,
                             target=target)
