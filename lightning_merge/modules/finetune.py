"""Stage 2: fine-tuning. The LightningModule that trains a backbone on a task and exports it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassStatScores

from lightning_merge.atomic import check_writable
from lightning_merge.backbones import Backbone
from lightning_merge.modules.stage_data import connect_data
from lightning_merge.regularization import l2_to_reference


class FineTuneModule(pl.LightningModule):
    """Fine-tune a text or ViT backbone (cross-entropy, or MSE when the head has one output).

    AdamW with linear warm-up then linear decay to zero over the run. Optional regularization
    ``l2_to_pretrained · ‖θ_body − θ_0‖²`` towards the weights the backbone was built from (arXiv
    version §3.3.1, appendix A: 3e-4; default 0 = off). The task head is never regularized. θ_0 is a
    single detached copy of the body, kept only when the term is on, and not saved in checkpoints (it
    is the backbone's own starting point, rebuilt with it).

    ``freeze_body`` trains the task head alone (a linear probe).

    At the end of ``fit`` the backbone is exported in its native format to ``export_dir`` (default:
    ``<log_dir>/export``, beside ``checkpoints/``), ready for the Fisher and merge stages.
    """

    def __init__(self, backbone: Backbone, learning_rate: float = 2e-5, weight_decay: float = 0.0,
                 warmup_ratio: float = 0.0, l2_to_pretrained: float = 0.0, export_dir: str | None = None,
                 freeze_body: bool = False) -> None:
        super().__init__()
        if l2_to_pretrained < 0:
            raise ValueError(f"l2_to_pretrained must be >= 0, got {l2_to_pretrained}")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self._bind_body()
        self.eval_metrics = nn.ModuleList()
        self.predicted = nn.ModuleList()
        self.single_class: dict[str, tuple[int, int]] = {}
        self.eval_set_names: list[str] = []

    def _bind_body(self) -> None:
        """The body parameters (and, for the L2 term, their pre-trained copies) of the current backbone."""
        self._body = [p for _, p in self.backbone.body_named_parameters()]
        if self.hparams.freeze_body:  # a linear probe: only the task head learns (e.g. the zero-shot end of WiSE-FT)
            for p in self._body:
                p.requires_grad_(False)
        self._reference = [p.detach().clone() for p in self._body] if self.hparams.l2_to_pretrained > 0 else []

    # -- set-up ----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        labels = datamodule.num_labels
        if labels is not None and labels != self.backbone.num_labels and self.backbone.head_is_fresh:
            self.backbone.resize_head(labels)  # a new head takes the data's size: no num_labels in configs
            self._bind_body()
        connect_data(self.backbone, datamodule)
        if datamodule.num_labels != self.backbone.num_labels:
            raise ValueError(
                f"The model's head has {self.backbone.num_labels} outputs but the data has "
                f"{datamodule.num_labels} labels; set the backbone's num_labels (and reinit_head) to match"
            )
        if stage == "fit" and self.trainer.is_global_zero:
            check_writable(self._export_directory().parent, "fine-tuned model")
        self.eval_set_names = list(datamodule.eval_set_names)
        self.eval_metrics = nn.ModuleList(datamodule.task_metrics() for _ in self.eval_set_names)
        classes = self.backbone.num_labels
        # how often each class is predicted: a model that predicts one class has learned nothing
        self.predicted = nn.ModuleList(MulticlassStatScores(classes, average=None) for _ in self.eval_set_names) \
            if classes > 1 else nn.ModuleList()
        self.single_class: dict[str, tuple[int, int]] = {}

    def on_fit_start(self) -> None:
        self._reference = [r.to(self.device) for r in self._reference]
        # `from_pretrained` returns models in eval mode and Lightning keeps each module's mode: without
        # this, fine-tuning would run with dropout off.
        self.backbone.train()

    def configure_optimizers(self):
        hp = self.hparams
        trainable = [p for p in self.backbone.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=hp.learning_rate,
                                      weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = int(hp.warmup_ratio * total)

        def linear(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(total - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- steps -----------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone(batch)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[-1] == 1:
            return F.mse_loss(logits[:, 0].float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.task_loss(self(batch), batch["labels"])
        self.log("train/task_loss", loss, prog_bar=True, batch_size=len(batch["labels"]))
        if self._reference:
            distance = l2_to_reference(self._body, self._reference)
            loss = loss + self.hparams.l2_to_pretrained * distance
            self.log("train/l2_to_pretrained", distance, batch_size=len(batch["labels"]))
        return loss

    def _eval_step(self, batch, dataloader_idx: int) -> None:
        logits = self(batch)
        self.eval_metrics[dataloader_idx].update(logits, batch["labels"])
        if len(self.predicted):
            self.predicted[dataloader_idx].update(logits, batch["labels"])

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def _log_eval(self, prefix: str) -> None:
        for i, (name, metrics) in enumerate(zip(self.eval_set_names, self.eval_metrics)):
            values = metrics.compute()
            for key, value in values.items():
                self.log(f"{prefix}/{name}/{key}", value, add_dataloader_idx=False)
            if i == 0:
                # The first evaluation set (the task itself, or IID) drives checkpoint selection.
                self.log(f"{prefix}/score", values["score"], prog_bar=True, add_dataloader_idx=False)
            metrics.reset()
            if len(self.predicted):
                stats = self.predicted[i].compute()  # per class: tp, fp, tn, fn, support
                counts = (stats[:, 0] + stats[:, 1]).tolist()
                used = [c for c, n in enumerate(counts) if n > 0]
                if len(used) == 1:
                    self.single_class[name] = (used[0], int(sum(counts)))
                else:
                    self.single_class.pop(name, None)
                self.predicted[i].reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # -- export ----------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        for name, (label, total) in self.single_class.items():
            label_name = self.backbone.label_names[label] if self.backbone.label_names else label
            rank_zero_warn(f"the fine-tuned model predicts one class, {label_name!r}, for all {total} examples of "
                           f"{name} at its last validation: it has not learned the task (try a higher learning rate, "
                           f"more epochs or more examples)")
        self._export()

    def _export_directory(self) -> Path:
        return Path(self.hparams.export_dir or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "export")

    @rank_zero_only
    def _export(self) -> None:
        directory = self._export_directory()
        self.backbone.export(directory)
        logs = self.trainer.log_dir or self.trainer.default_root_dir
        self.summary = (f"exported the fine-tuned {self.backbone.family} model to {directory} "
                        f"(logs and checkpoints: {logs})")
        rank_zero_info(self.summary[0].upper() + self.summary[1:])
