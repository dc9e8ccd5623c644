"""Task metrics with torchmetrics, following GLUE's conventions.

A task's *score* is the mean of its metrics (e.g. MRPC = mean of accuracy and F1; STS-B = mean of
Pearson and Spearman), as in the NeurIPS paper §3.1.1 ("we report the average over metrics").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryF1Score,
    MulticlassAccuracy,
    MulticlassF1Score,
    MulticlassMatthewsCorrCoef,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

CLASS_METRICS = ("accuracy", "f1", "matthews_corrcoef", "micro_f1", "macro_f1")
SCORE_METRICS = ("pearson", "spearman")


def _make(name: str, num_labels: int):
    if name == "accuracy":
        return MulticlassAccuracy(num_classes=num_labels, average="micro")
    if name == "f1":
        return BinaryF1Score()
    if name in ("micro_f1", "macro_f1"):  # multi-class F1 (Gururangan et al.'s ChemProt / ACL-ARC, SciERC)
        return MulticlassF1Score(num_classes=num_labels, average=name.split("_")[0])
    if name == "matthews_corrcoef":
        return MulticlassMatthewsCorrCoef(num_classes=num_labels)
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    raise ValueError(f"Unknown metric {name!r}; known: {CLASS_METRICS + SCORE_METRICS}")


class TaskMetrics(nn.Module):
    """Accumulates one task's metrics from logits; ``compute()`` adds the mean as ``score``.

    Args:
        metrics: names from ``accuracy``, ``f1``, ``matthews_corrcoef``, ``pearson``, ``spearman``.
        num_labels: logits' width. With one logit, it *is* the predicted score (regression).
        bucket_values: for a regression task trained as classification (STS-B buckets), the score each
            class stands for; predictions and labels are scored through it.
    """

    def __init__(self, metrics: Sequence[str], num_labels: int, bucket_values: torch.Tensor | None = None):
        super().__init__()
        self.collection = MetricCollection({name: _make(name, num_labels) for name in metrics})
        self.scored = any(m in SCORE_METRICS for m in metrics)
        self.register_buffer("bucket_values", bucket_values, persistent=False)

    def _as_scores(self, values: torch.Tensor) -> torch.Tensor:
        return self.bucket_values[values] if self.bucket_values is not None else values.float()

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.detach().float()
        if not self.scored:
            self.collection.update(logits.argmax(-1), labels)
        elif logits.shape[-1] == 1:
            self.collection.update(logits[:, 0], labels.float())
        else:
            self.collection.update(self._as_scores(logits.argmax(-1)), self._as_scores(labels))

    def compute(self) -> dict[str, torch.Tensor]:
        values = {k: v.float() for k, v in self.collection.compute().items()}
        values["score"] = torch.stack(list(values.values())).mean()
        return values

    def reset(self) -> None:
        self.collection.reset()
