"""What the later stages ask of a data module, as typed protocols (checked with ``isinstance``), so a
stage never probes a data module with ``hasattr`` and a data module never reaches into the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from torch.utils.data import DataLoader


@runtime_checkable
class ModelAware(Protocol):
    """Takes what it needs from the model (a tokenizer, an input size) when a stage hands it over: the
    fine-tune, Fisher, Gram and merge stages call :meth:`attach_model` in their ``setup``, before any
    loader is built (data modules tokenize or size images lazily, at their first loader)."""

    def attach_model(self, backbone: Any) -> None: ...


@runtime_checkable
class EvaluationData(ModelAware, Protocol):
    """A data module a merge can evaluate on: its task metrics, and loaders over any subset of each
    evaluation set (set 0 is the task's own; further sets are e.g. OOD shifts). It also has the
    properties ``num_labels`` and ``eval_set_names`` (not part of the ``isinstance`` check, which would
    evaluate them on Python 3.11)."""

    def task_metrics(self) -> Any: ...

    def setup(self, stage: str) -> None: ...

    def eval_size(self, set_index: int = 0, stage: str = "validate") -> int: ...

    def eval_loader(self, indices: Sequence[int], set_index: int = 0, stage: str = "validate") -> DataLoader: ...
