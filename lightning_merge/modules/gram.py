"""Stage 3b: Gram matrices of a model's linear-layer inputs (RegMean's statistics) with ``trainer.predict``
on 1..N devices."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.utilities import rank_zero_info

from lightning_merge.atomic import check_writable
from lightning_merge.backbones import Backbone
from lightning_merge.modules.fisher import provenance, stop_if_terminated
from lightning_merge.modules.stage_data import connect_data
from lightning_merge.statistics.gram import GramAccumulator, linear_layers, weight_keys
from lightning_merge.statistics.gram_file import save_gram

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class GramEstimationModule(pl.LightningModule):
    """``G = Σ_examples Σ_real tokens x xᵀ`` of every body linear layer's input (RegMean, Jin et al.,
    ICLR 2023, §3: ``G_i = X_iᵀ X_i``) over the examples of the data module's ``predict_dataloader``,
    written to ``output`` (a Gram file: :mod:`lightning_merge.statistics.gram_file`).

    Padded positions (``attention_mask == 0``) are left out; layers that read one input (query, key,
    value) share one Gram. Runs under predict's inference mode. On several devices each rank sums its
    own examples and the sums are added across ranks (each example counted once).

    Args:
        backbone: the fine-tuned model (e.g. a fine-tune stage's ``export`` directory).
        output: the ``.safetensors`` file to write; a name ending in ``.safetensors.index.json`` writes
            shards of at most ``shard_mb`` MiB and that index.
        dtype: accumulate (and store) in ``float32`` or ``float64``.
    """

    def __init__(self, backbone: Backbone, output: str, dtype: Literal["float32", "float64"] = "float32",
                 shard_mb: PositiveInt = 4096) -> None:
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"GramEstimationModule(dtype={dtype!r}): choose float32 or float64")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.engine: GramAccumulator | None = None
        self.num_examples = 0

    def setup(self, stage: str) -> None:
        connect_data(self.backbone, self.trainer.datamodule)

    def on_predict_start(self) -> None:
        if self.trainer.is_global_zero:  # found now, not after the whole estimation
            check_writable(Path(self.hparams.output).parent, "Gram file")
        self.backbone.eval()
        self.layers = linear_layers(self.backbone.model, self.backbone.is_head, self.backbone.transposed_linear)
        if not self.layers:
            raise ValueError(f"{type(self.backbone).__name__} has no linear layer outside its head: "
                             "no Gram to estimate")
        self.engine = GramAccumulator(self.layers, _DTYPES[self.hparams.dtype])
        self.num_examples = 0

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        stop_if_terminated(self.trainer, "Gram", self.hparams.output, self.num_examples)
        with self.engine.capture(batch.get("attention_mask")):
            self.backbone(batch)
        self.num_examples += len(batch["labels"])

    def on_predict_end(self) -> None:
        engine, self.engine = self.engine, None
        engine.detach()
        strategy = self.trainer.strategy
        # Lightning's reduce defaults to *mean*: ask for the sum.
        total = int(strategy.reduce(torch.tensor(float(self.num_examples), device=self.device), reduce_op="sum"))
        if total == 0:
            raise ValueError("Gram estimation saw no examples: the predict dataset is empty")
        sums = {key: strategy.reduce(value, reduce_op="sum") for key, value in sorted(engine.sums.items())}
        rows = {key: int(strategy.reduce(torch.tensor(float(n), dtype=torch.float64, device=self.device),
                                         reduce_op="sum")) for key, n in sorted(engine.rows.items())}
        if self.trainer.is_global_zero:
            metadata = {"num_examples": total, "num_tokens": max(rows.values()), "dtype": self.hparams.dtype,
                        **provenance(self.backbone, self.trainer.datamodule)}
            transposed = [f"{name}.weight" for name, layer in self.layers.items()
                          if isinstance(layer, self.backbone.transposed_linear)]
            save_gram(self.hparams.output, sums, rows, weight_keys(self.layers, engine.shared), metadata,
                      shard_bytes=self.hparams.shard_mb << 20, transposed=transposed)
            self.summary = (f"wrote {len(sums)} Grams ({len(self.layers)} linear layers) of {total} examples to "
                            f"{self.hparams.output}")
            rank_zero_info(self.summary[0].upper() + self.summary[1:])
        strategy.barrier()
