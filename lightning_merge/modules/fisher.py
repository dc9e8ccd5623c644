"""Stage 3: estimate a fine-tuned model's diagonal Fisher with ``trainer.predict`` on 1..N devices."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch.utilities import rank_zero_info

import lightning_merge
from lightning_merge.atomic import check_writable
from lightning_merge.backbones import Backbone
from lightning_merge.fisher.directions import VARIANTS, logit_directions
from lightning_merge.fisher.io import save_fisher
from lightning_merge.fisher.masks import MaskFisherEngine
from lightning_merge.fisher.per_example import PerExampleSquaredGradients
from lightning_merge.fisher.provenance import FINGERPRINT_KEY, fingerprint_tensors
from lightning_merge.modules.stage_data import connect_data

Variant = Literal["auto", "exact", "sampled", "empirical"]
Kind = Literal["full", "mask"]

AUTO = "auto"
MAX_EXACT_LABELS = 1024  # beyond this, C−1 backward passes per batch are not a sensible plan
FULL, MASK = "full", "mask"


class FisherEstimationModule(pl.LightningModule):
    """``F = 1/N Σ_i E_{y~p(y|x_i)} (∇θ log p(y|x_i))²`` (NeurIPS paper eq. 2) over the examples that
    the data module's ``predict_dataloader`` yields (its ``max_predict_examples``, seeded; paper
    §3.1.1 uses 4096 training examples), written to ``output`` as safetensors.

    Run with ``lightning-merge predict`` and ``trainer.inference_mode: false`` (predict runs under
    inference mode by default, where no gradient exists). On several devices each rank sums its own
    examples; the sums and the example count are added across ranks and divided once.

    Args:
        backbone: the fine-tuned model (e.g. a fine-tune stage's ``export`` directory).
        output: the ``.safetensors`` file to write; a name ending in ``.safetensors.index.json`` writes
            shards of at most ``shard_mb`` MiB and that index (for models too large for one file).
        kind: ``full`` (every parameter) or ``mask`` (one mask per attention head and FFN unit; paper
            003 §3, eq. 4), stored compactly with its layout and expanded only when merging.
        variant: ``exact`` (expectation over all labels), ``sampled`` (``num_samples`` labels from the
            model's own ``p``), ``empirical`` (the true label: a different quantity, for comparison),
            or ``auto``, which weighs cost: the exact expectation takes one backward pass per label and
            batch, so it is used up to ``max_exact_classes`` labels (default 16: GLUE's tasks, digits),
            and above that ``num_samples`` sampled labels (an unbiased estimate of the same quantity;
            e.g. STS-B's 25 buckets). The file's header says which was used and why (``variant_reason``).
        seed: for the sampled labels (each rank offsets it by its rank).
    """

    def __init__(self, backbone: Backbone, output: str, variant: Variant = AUTO, kind: Kind = FULL,
                 num_samples: PositiveInt = 1, max_exact_classes: PositiveInt = 16, seed: int = 0,
                 shard_mb: PositiveInt = 4096) -> None:
        super().__init__()
        if kind not in (FULL, MASK):
            raise ValueError(f"Unknown Fisher kind {kind!r}; choose {FULL!r} (every parameter) or {MASK!r}")
        if variant not in (*VARIANTS, AUTO):
            raise ValueError(f"Unknown Fisher variant {variant!r}; choose one of {(*VARIANTS, AUTO)}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self._choose_variant()
        self.engine: PerExampleSquaredGradients | MaskFisherEngine | None = None
        self.num_examples = 0

    def _choose_variant(self) -> None:
        """``variant`` and why (``variant_reason``): ``auto`` decides by the head size, known for sure only
        once the data has described the task (a CLIP zero-shot head is built from its class names), so
        this runs again in :meth:`setup`."""
        backbone, variant, limit = self.backbone, self.hparams.variant, self.hparams.max_exact_classes
        reason, labels = "asked for", backbone.num_labels
        if variant == AUTO and backbone.several_outputs:
            variant, reason = "sampled", "auto: several outputs per example (masked positions)"
        elif variant == AUTO and labels <= limit:
            variant, reason = "exact", f"auto: {labels} labels <= max_exact_classes {limit}"
        elif variant == AUTO:
            variant = "sampled"
            reason = (f"auto: {labels} labels > max_exact_classes {limit} (the exact expectation would take "
                      f"{labels} backward passes per batch, sampled takes {self.hparams.num_samples})")
        if variant == "exact" and backbone.several_outputs:
            raise ValueError(f"{type(backbone).__name__} has several outputs per example (masked positions): "
                             "the exact Fisher is not offered there; use variant sampled (or auto)")
        self.variant, self.variant_reason = variant, reason

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        connect_data(self.backbone, datamodule)
        self._choose_variant()
        if self.variant == "exact" and self.backbone.num_labels > MAX_EXACT_LABELS:
            raise ValueError(f"the exact Fisher needs {self.backbone.num_labels - 1} backward passes per batch "
                             f"({self.backbone.num_labels} labels): use variant sampled (or auto)")
        labels = getattr(datamodule, "num_labels", None)
        if labels is not None and labels != self.backbone.num_labels:
            raise ValueError(f"The model's head has {self.backbone.num_labels} outputs but the data has "
                             f"{datamodule.num_labels} labels: is this the model fine-tuned on this task?")

    def on_predict_start(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Fisher estimation needs gradients: run predict with `--trainer.inference_mode "
                               "false` (trainer.inference_mode: false in YAML)")
        if self.trainer.is_global_zero:  # found now, not after the whole estimation
            check_writable(Path(self.hparams.output).parent, "Fisher file")
        self.backbone.eval()
        if self.hparams.kind == MASK:
            self.mask_sites = self.backbone.mask_sites()
            self.engine = MaskFisherEngine(self.backbone.model, self.mask_sites)
        else:
            self.engine = PerExampleSquaredGradients(self.backbone.model,
                                                     added_parameters=self.backbone.added_parameters(),
                                                     transposed_linear=self.backbone.transposed_linear)
        self.generator = torch.Generator().manual_seed(self.hparams.seed + self.global_rank)
        self.num_examples = 0

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # No collective here: ranks may run different numbers of batches.
        stop_if_terminated(self.trainer, "Fisher", self.hparams.output, self.num_examples)
        size = len(batch["labels"])
        with self.engine.capture(size):
            logits = self.backbone(batch)
            directions = logit_directions(logits, self.variant, batch["labels"], self.hparams.num_samples,
                                          self.generator)
            self.engine.accumulate(logits, directions)
        self.num_examples += size

    def on_predict_end(self) -> None:
        engine, self.engine = self.engine, None
        engine.detach()
        sums = engine.sums
        strategy = self.trainer.strategy
        # Lightning's reduce defaults to *mean*: ask for the sum.
        total = int(strategy.reduce(torch.tensor(float(self.num_examples), device=self.device), reduce_op="sum"))
        if total == 0:
            raise ValueError("Fisher estimation saw no examples: the predict dataset is empty")
        fisher = {name: strategy.reduce(s, reduce_op="sum") / total for name, s in sums.items()}
        if self.trainer.is_global_zero:
            save_fisher(self.hparams.output, fisher, self.metadata(total), self.hparams.shard_mb << 20)
            self.summary = (f"wrote the {self.variant} {self.hparams.kind} Fisher of {total} examples to "
                            f"{self.hparams.output}" + (f" ({self.variant_reason})" if self.hparams.variant == AUTO
                                                        else ""))
            rank_zero_info(self.summary[0].upper() + self.summary[1:])
        strategy.barrier()

    def metadata(self, num_examples: int) -> dict[str, object]:
        return {
            "num_examples": num_examples,
            "variant": self.variant,
            "variant_reason": self.variant_reason,
            "kind": self.hparams.kind,
            **({"mask_layout": {s.name: s.layout() for s in self.mask_sites}}
               if self.hparams.kind == MASK else {}),
            "samples_per_example": self.hparams.num_samples if self.variant == "sampled" else 0,
            "num_labels": self.backbone.num_labels,
            **provenance(self.backbone, self.trainer.datamodule),
        }


def stop_if_terminated(trainer: pl.Trainer, what: str, output: str, done: int) -> None:
    """Predict loops do not stop on SIGTERM (Lightning only records it): stop at the next batch, so
    an interrupted estimate is never written as if complete."""
    if trainer.received_sigterm:
        raise RuntimeError(f"{what} estimation stopped by SIGTERM after {done} examples; nothing written to {output}")


def provenance(backbone: Backbone, datamodule) -> dict[str, object]:
    """Where a statistics file came from: the model (its source and weight fingerprint), the data and
    split, the library version (header fields shared by Fisher and Gram files)."""
    hp = getattr(datamodule, "hparams", {})
    return {
        "model_source": str(getattr(backbone, "name_or_path", None) or getattr(backbone, "checkpoint", None)
                            or backbone.family),
        "dataset": f"{type(datamodule).__name__}:{hp.get('task', hp.get('source', ''))}",
        "split": str(hp.get("predict_split", "train")),
        "library_version": f"lightning_merge {lightning_merge.__version__}",
        FINGERPRINT_KEY: fingerprint_tensors(dict(backbone.model.named_parameters())),
    }
