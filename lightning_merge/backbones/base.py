"""The one interface the fine-tune, Fisher and merge stages use for every model family.

A backbone wraps a classifier (``self.model``), turns a batch into logits, says which parameters
are the task head (never merged) and which are the shared body, and exports itself in the family's
native format so a later stage (or another tool) can load it. Parameter names are those of
``self.model.named_parameters()``: the same keys the Fisher and merge files use.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import nn

from lightning_merge.atomic import staged_directory

EXPORT_MANIFEST = "lightning_merge.json"
#: family name -> class; a family registers itself by subclassing :class:`Backbone` with a ``family``
FAMILIES: dict[str, type[Backbone]] = {}


class Backbone(nn.Module, ABC):
    family: str = ""
    model: nn.Module
    head_prefixes: tuple[str, ...] = ()
    tokenizer = None  # text backbones set this
    #: several categorical outputs per example (a masked LM's positions): the exact expectation over
    #: labels would need (C−1) backward passes per output, so Fisher estimation samples labels instead
    several_outputs: bool = False
    #: the task's class names (``id2label`` of a Hugging Face export), set by :meth:`describe_task`
    label_names: list[str] | None = None
    #: how inputs are prepared (timm's ``pretrained_cfg`` keys: input_size, mean, std, interpolation, ...)
    preprocessing: dict | None = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("family"):
            FAMILIES[cls.family] = cls

    @classmethod
    def from_export(cls, directory: str, **options) -> Backbone:
        """Rebuild from an :meth:`export` folder (Hugging Face families also read plain checkpoint folders
        and hub ids); ``options`` are further constructor arguments (e.g. CLIP's ``clip``)."""
        return cls(str(directory), **options)

    @property
    @abstractmethod
    def num_labels(self) -> int:
        """Size of the task head's output."""

    @abstractmethod
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``(batch, num_labels)`` for a batch as the family's data module builds it."""

    @abstractmethod
    def _export_files(self, directory: Path) -> dict:
        """Write the native files into ``directory``; return what the manifest needs to rebuild."""

    #: Hugging Face ``model_type`` values this family loads when a folder or hub id has no export manifest
    hf_model_types: tuple[str, ...] = ()
    #: module types that compute ``y = x W + b`` with ``W`` stored ``(in, out)`` (GPT-2's ``Conv1D``):
    #: the Fisher and Gram engines treat them as linear layers in that layout
    transposed_linear: tuple[type, ...] = ()

    #: the task head is new (not trained yet), so the data may size it (:meth:`resize_head`)
    head_is_fresh: bool = False

    def resize_head(self, num_labels: int) -> None:
        """Start a fresh head of ``num_labels`` outputs (the body unchanged); only when ``head_is_fresh``."""
        raise NotImplementedError(f"{type(self).__name__} cannot resize its head")

    def added_parameters(self) -> list:
        """Parameters added to a module's output (:class:`~lightning_merge.backbones.mask_sites.AddedParameter`)
        that the per-example Fisher engine cannot find from layer types alone; default: none."""
        return []

    def mask_sites(self) -> list:
        """Where mask-node Fisher masks go (:class:`lightning_merge.backbones.mask_sites.MaskSite`, paper 003 §3)."""
        raise NotImplementedError(f"{type(self).__name__} does not define mask sites")

    def describe_task(self, label_names: list[str] | None, preprocessing: dict | None = None) -> None:
        """Record what the data says about the task, so exports carry it (class names, preprocessing)."""
        if label_names is not None and len(label_names) == self.num_labels:
            self.label_names = [str(n) for n in label_names]
        if preprocessing is not None:
            self.preprocessing = dict(preprocessing)

    def is_head(self, name: str) -> bool:
        return name.startswith(self.head_prefixes)

    def head_parameter_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters() if self.is_head(n)]

    def body_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if not self.is_head(n)]

    def export(self, directory: str | os.PathLike) -> Path:
        """Export in the native format, atomically: files go to a temporary folder that is renamed.

        An existing export at ``directory`` is replaced only once the new one is complete.
        """
        directory = Path(directory)
        with staged_directory(directory) as staging:
            manifest = {"family": self.family, "num_labels": self.num_labels,
                        **({"label_names": self.label_names} if self.label_names else {}),
                        **self._export_files(staging)}
            (staging / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))
        return directory


def read_manifest(directory: str | os.PathLike) -> dict:
    path = Path(directory) / EXPORT_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}
