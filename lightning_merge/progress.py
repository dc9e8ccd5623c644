"""Progress as plain lines when stdout is not a terminal (a log file, a pipe, a batch job): Lightning's
bars redraw themselves with carriage returns, which a log keeps as one garbled line per refresh."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import ProgressBar

TRAIN, VALIDATION, PREDICT = "train", "validation", "predict"


def _total(batches, index: int):
    return batches[index] if isinstance(batches, list) and index < len(batches) else batches


class PlainProgress(ProgressBar):
    """Per loop (train, validation, predict), one line at most every ``every_s`` seconds and one when the
    loop ends: the stage, the batch count, batches per second and the logged metrics (rank 0 only)."""

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._enabled = True
        self._began: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._done: dict[str, int] = {}

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _start(self, loop: str) -> None:
        self._began[loop] = self._last[loop] = time.monotonic()
        self._done[loop] = 0

    def _line(self, trainer, pl_module, loop: str, what: str, done: int, total, final: bool = False) -> None:
        now = time.monotonic()
        self._done[loop] = done
        if not self._enabled or not trainer.is_global_zero or (not final and now - self._last[loop] < self.every_s):
            return
        self._last[loop] = now
        rate = done / max(now - self._began[loop], 1e-9)
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        shown = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in metrics.items())
        total = "?" if total is None or total == float("inf") else int(total)
        print(f"{what} {done}/{total} ({rate:.2f} batches/s){shown}", flush=True)

    def _epoch(self, trainer) -> str:
        return f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start(TRAIN)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._line(trainer, pl_module, TRAIN, f"{self._epoch(trainer)}: train batch", batch_idx + 1,
                   self.total_train_batches)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._line(trainer, pl_module, TRAIN, f"{self._epoch(trainer)} done: train batches", self._done[TRAIN],
                   self.total_train_batches, final=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._start(VALIDATION)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._line(trainer, pl_module, VALIDATION, f"validation set {dataloader_idx}: batch", batch_idx + 1,
                       _total(trainer.num_val_batches, dataloader_idx))

    def on_predict_start(self, trainer, pl_module) -> None:
        self._start(PREDICT)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._line(trainer, pl_module, PREDICT, "predict batch", batch_idx + 1,
                   _total(trainer.num_predict_batches, dataloader_idx))

    def on_predict_end(self, trainer, pl_module) -> None:
        self._line(trainer, pl_module, PREDICT, "predict done: batches", self._done[PREDICT],
                   _total(trainer.num_predict_batches, 0), final=True)
