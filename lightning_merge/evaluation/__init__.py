from lightning_merge.evaluation.metrics import TaskMetrics

__all__ = ["TaskMetrics"]
