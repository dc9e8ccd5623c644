"""Where a merge reads its tensors: models and shared inputs (in memory or in safetensors files) and
per-model statistics (Fisher, mask Fisher, ...), all behind one small reader interface, so that the
merge driver runs the same code on both."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch

from lightning_merge.fisher.io import decoded_header, open_statistics
from lightning_merge.fisher.masks import PAPER, expand_mask_fisher
from lightning_merge.tensor_files import Checkpoint


class TensorReader(Protocol):
    """Named tensors, read as flat element ranges."""

    label: str

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> torch.Size: ...

    def read(self, name: str, start: int, stop: int) -> torch.Tensor: ...

    def close(self) -> None: ...


class MemoryTensors:
    """Tensors held in memory (a state dict, or views of flat buffers); reads are views, not copies."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], label: str = "model") -> None:
        self.tensors, self.label = dict(tensors), label
        self._flat = {n: t.detach().reshape(-1) for n, t in self.tensors.items()}

    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> torch.Size:
        return self.tensors[name].shape

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._flat[name][start:stop]

    def close(self) -> None:
        pass


class CheckpointTensors:
    """A model (or shared input such as the pre-trained ``base``) in safetensors files: one file, an
    export folder, or a sharded folder."""

    def __init__(self, path: str | os.PathLike, label: str | None = None) -> None:
        self.checkpoint = Checkpoint(path)
        self.label = label or str(path)

    def names(self) -> list[str]:
        return self.checkpoint.keys()

    def shape(self, name: str) -> torch.Size:
        return self.checkpoint.shape(name)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.checkpoint.read(name, start, stop)

    def close(self) -> None:
        self.checkpoint.close()


def check_statistics(values: torch.Tensor, name: str, label: str) -> None:
    """The one check every statistics tensor passes before any arithmetic: floating, finite, ≥ 0."""
    if not values.dtype.is_floating_point:
        raise ValueError(f"{label}: {name!r} has dtype {values.dtype}; statistics (a Fisher is a mean of squares) "
                         f"are stored as floats")
    if values.numel() and float(values.min()) >= 0 and math.isfinite(float(values.sum())):
        return  # fast path without temporaries: ≥ 0 everywhere and a finite sum means no NaN/Inf
    if not torch.isfinite(values).all():
        raise ValueError(f"{label}: {name!r} has NaN or Inf entries")
    if (values < 0).any():
        raise ValueError(f"{label}: {name!r} has negative entries")


class Statistics:
    """One model's per-parameter statistics for the tensors in ``shapes``: a diagonal Fisher file (read
    in slices, or all at once with ``in_memory``), a mask Fisher file (paper 003 §3; expanded to each
    parameter's shape by ``mask_rule``, one tensor at a time), or tensors already in memory. Every
    value read is checked by :func:`check_statistics`; names and shapes are checked on opening."""

    def __init__(self, source: str | os.PathLike | Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                 label: str, mask_rule: str = PAPER, in_memory: bool = False) -> None:
        self.shapes, self.label = dict(shapes), label
        self.path = None if isinstance(source, Mapping) else Path(source)
        self.file: Checkpoint | None = None if self.path is None else open_statistics(self.path)
        self.metadata: dict = {} if self.file is None else decoded_header(self.file)
        self._current: tuple[str | None, torch.Tensor | None] = (None, None)
        self._loaded: dict[str, torch.Tensor] | None = None
        if self.path is None:
            self._loaded = {n: source[n].reshape(-1) for n in self._present(set(source))}
            self._check_shapes({n: source[n].shape for n in self.shapes})
        elif self.metadata.get("kind") == "mask":
            layout = self.metadata.get("mask_layout")
            if not isinstance(layout, dict):
                self.close()
                raise ValueError(f"{label}: mask Fisher {self.path} has no mask_layout in its header")
            masks = {n: self.file.read_tensor(n) for n in layout}
            self.close()
            for n, value in masks.items():
                check_statistics(value, n, label)
            self._expand = lambda name: expand_mask_fisher(masks, layout, {name: self.shapes[name]}, mask_rule)[name]
        else:
            self._present(set(self.file.keys()))
            self._check_shapes({n: self.file.shape(n) for n in self.shapes})
        if in_memory and self._loaded is None:
            self._loaded = {n: self._whole(n) for n in self.shapes}
            self.close()
        if self._loaded is not None:
            for n in self.shapes:
                check_statistics(self._loaded[n], n, label)

    def _present(self, available: set[str]) -> list[str]:
        missing = [n for n in self.shapes if n not in available]
        if missing:
            raise KeyError(f"{self.label} has no entry for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        return list(self.shapes)

    def _check_shapes(self, found: Mapping[str, torch.Size]) -> None:
        for n, shape in found.items():
            if tuple(shape) != tuple(self.shapes[n]):
                raise ValueError(f"{self.label}: {n!r} has shape {tuple(shape)}, the parameter {tuple(self.shapes[n])}")

    def _whole(self, name: str) -> torch.Tensor:
        if self.file is not None:
            return self.file.read(name)
        return self._expand(name).reshape(-1)

    def to(self, device: torch.device | str) -> Statistics:
        if self._loaded is None:
            raise RuntimeError(f"{self.label}: only statistics read whole (in_memory) can move to a device")
        self._loaded = {n: v.to(device) for n, v in self._loaded.items()}
        return self

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        if self._loaded is not None:
            return self._loaded[name][start:stop]
        if self.file is not None:
            values = self.file.read(name, start, stop)
            check_statistics(values, name, self.label)
            return values
        if self._current[0] != name:  # a mask Fisher: expanded (and checked) once per tensor, not per slice
            expanded = self._expand(name).reshape(-1)
            check_statistics(expanded, name, self.label)
            self._current = (name, expanded)
        return self._current[1][start:stop]

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
