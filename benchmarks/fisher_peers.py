"""The exact Fisher (NeurIPS paper eq. 2) against peer libraries that compute per-example quantities,
side by side in one process, each checked against this project's result before it is timed.

    python benchmarks/fisher_peers.py [--rounds 3] [--threads 1] [--models mlp,minilm_c3,minilm_c2,vit_tiny]
                                      [--json out.json]

Every method computes ``Σ_b Σ_c (∇θ d_bcᵀ z_b)²`` for the same directions ``d`` (the exact Fisher's
``C − 1`` directions of :func:`exact_directions`, or the library's own exact Fisher where it has one):

* ``project``: :class:`PerExampleSquaredGradients` (this project);
* ``torch_func``: ``vmap(grad)`` of ``d_bcᵀ z_b`` over examples, one pass per direction;
* ``opacus``: Opacus ``GradSampleModule`` per-sample gradients, one forward and backward per direction;
* ``backpack``: BackPACK ``DiagGGNExact`` (the GGN of softmax cross-entropy is the exact Fisher);
* ``asdl``: ASDL ``FISHER_EXACT`` with ``SHAPE_DIAG``;
* ``nngeometry``: nngeometry ``FIM`` with ``PMatDiag`` (``classif_logits``);
* ``train``: one training step (forward + backward of the mean cross-entropy), the yardstick.

Correctness: each peer's Fisher on the first batch against the project's, as the largest per-tensor
``max |a − b| / max |b|`` after one global scale (libraries differ in dividing by the batch size; the
scale is reported); above 1e-3 the peer is marked wrong and its speed is not a competitor's. A peer
that refuses a model is reported with its error. Timing: methods round-robin batch by batch, the order
rotating each round; the figure is the median seconds per batch over ``--rounds`` after a warm-up.
Peers are optional: ``pip install -e ".[bench]"``; an absent one is skipped with a line.
"""

from __future__ import annotations

from lightning_merge.command import prepare_process

prepare_process()  # as `lightning-merge` runs: set before torch loads its OpenMP runtime

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
PEERS = ("torch_func", "opacus", "backpack", "asdl", "nngeometry")
TOLERANCE = 1e-3


class Case:
    """A model, its batches (``(inputs: dict, labels)``), how it turns inputs into logits."""

    def __init__(self, name, model, batches, call, num_classes, added=()):
        self.name, self.model, self.batches, self.call, self.num_classes = name, model, batches, call, num_classes
        self.added = added  # what the Fisher engine must be told is added to a module's output


def mlp_case(batches: int) -> Case:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3)).eval()
    data = [({"x": torch.randn(200, 384)}, torch.randint(0, 3, (200,))) for _ in range(batches)]
    return Case("mlp", model, data, lambda m, inputs: m(inputs["x"]), 3)


def minilm_case(batches: int, num_classes: int) -> Case:
    from fisher_speed import load, make_batches

    backbone = load(num_classes)
    data = []
    for b in make_batches(backbone.tokenizer, 16, batches, 128, num_classes):
        inputs = {k: v for k, v in b.items() if k != "labels"}
        # per-example position ids (BERT's default is one (1, T) row broadcast over the batch, which
        # per-sample-gradient libraries take for one example's)
        inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).expand_as(inputs["input_ids"]).clone()
        data.append((inputs, b["labels"]))
    return Case(f"minilm_c{num_classes}", backbone.model, data, lambda m, inputs: m(**inputs).logits, num_classes)


def vit_case(batches: int) -> Case:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, num_classes=10).eval()
    data = [({"x": torch.randn(16, 3, 32, 32)}, torch.randint(0, 10, (16,))) for _ in range(batches)]
    from lightning_merge.backbones.timm_vit import vit_added_parameters

    return Case("vit_tiny", model, data, lambda m, inputs: m(inputs["x"]), 10, vit_added_parameters(model))


def directions_of(case: Case, inputs) -> torch.Tensor:
    from lightning_merge.fisher.directions import exact_directions

    with torch.no_grad():
        return exact_directions(case.call(case.model, inputs))  # (K, B, C)


def named(case: Case) -> dict[str, nn.Parameter]:
    return dict(case.model.named_parameters())


# -- the methods: each returns step(inputs, labels) -> {name: Σ_b squared gradient} for that batch ----------
def project(case: Case):
    from lightning_merge.fisher import PerExampleSquaredGradients
    from lightning_merge.fisher.directions import exact_directions

    def step(inputs, labels):
        engine = PerExampleSquaredGradients(case.model, added_parameters=case.added)
        try:
            with engine.capture(len(labels)):
                logits = case.call(case.model, inputs)
                engine.accumulate(logits, exact_directions(logits))
        finally:
            engine.detach()
        return engine.sums
    return step


def train(case: Case):
    params = list(case.model.parameters())

    def step(inputs, labels):
        torch.nn.functional.cross_entropy(case.call(case.model, inputs), labels).backward()
        for p in params:
            p.grad = None
        return None
    return step


def torch_func(case: Case):
    from torch.func import functional_call, grad, vmap

    if hasattr(case.model, "config"):  # SDPA's mask preparation branches on data, which vmap cannot follow
        case.model.config._attn_implementation = "eager"
    params = {n: p.detach() for n, p in named(case).items()}

    def step(inputs, labels):
        directions = directions_of(case, inputs)

        def score(p, example, d):
            one = {k: v.unsqueeze(0) for k, v in example.items()}
            if "attention_mask" in one:  # a ready 4-D additive mask: transformers' 2-D mask path branches on data
                one["attention_mask"] = (1.0 - one["attention_mask"][:, None, None, :].float()) * -1e9
            logits = case.call(lambda *a, **kw: functional_call(case.model, p, a, kw), one)
            return (logits[0] * d).sum()

        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        for d in directions:
            grads = vmap(grad(score), in_dims=(None, 0, 0), randomness="same")(params, inputs, d)
            for n, g in grads.items():
                sums[n] += g.square().sum(0)
        return sums
    return step


def opacus(case: Case):
    from opacus import GradSampleModule

    # Opacus records activations only in train mode: train mode with every dropout off is the same function
    for module in case.model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for attr in ("dropout_prob", "attention_dropout"):
            if isinstance(getattr(module, attr, None), float):
                setattr(module, attr, 0.0)
    case.model.train()
    wrapped = GradSampleModule(case.model, batch_first=True, loss_reduction="sum")
    params = named(case)

    def step(inputs, labels):
        directions = directions_of(case, inputs)
        sums = {n: torch.zeros_like(p) for n, p in params.items()}
        for d in directions:
            (case.call(wrapped, inputs) * d).sum().backward()
            for n, p in params.items():
                if p.grad_sample is not None:
                    sums[n] += p.grad_sample.square().sum(0)
                p.grad_sample, p.grad = None, None
        return sums
    return step


def backpack(case: Case):
    from backpack import backpack as context
    from backpack import extend
    from backpack.extensions import DiagGGNExact

    model = extend(case.model)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="sum"))
    params = named(case)

    def step(inputs, labels):
        with context(DiagGGNExact()):
            loss_fn(case.call(model, inputs), labels).backward()
        out = {n: p.diag_ggn_exact.detach().clone() for n, p in params.items()}
        for p in params.values():
            p.grad = None
        return out
    return step


def asdl(case: Case):
    import asdl as lib

    config = lib.FisherConfig(fisher_type=lib.FISHER_EXACT, fisher_shapes=[lib.SHAPE_DIAG],
                              loss_type=lib.LOSS_CROSS_ENTROPY, data_size=1)
    maker = lib.get_fisher_maker(case.model, config)
    params = named(case)
    owner = {id(p): (m, attr) for m in case.model.modules() for attr, p in m.named_parameters(recurse=False)}

    def step(inputs, labels):
        dummy = maker.setup_model_call(lambda: case.call(case.model, inputs))
        maker.setup_loss_call(torch.nn.functional.cross_entropy, dummy, labels, reduction="sum")
        maker.forward_and_backward()
        out = {}
        for n, p in params.items():
            module, attr = owner[id(p)]
            diag = getattr(getattr(module, "fisher", None), "diag", None)
            value = getattr(diag, attr, None) if diag is not None else None
            if value is not None:
                out[n] = value.detach().clone().reshape(p.shape)
        for p in params.values():
            p.grad = None
        return out
    return step


def nngeometry(case: Case):
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag

    layers = LayerCollection.from_model(case.model)
    by_module = {id(m): name for name, m in case.model.named_modules()}

    def step(inputs, labels):
        if set(inputs) != {"x"}:
            raise TypeError("not run: this adapter feeds nngeometry one input tensor, BERT takes several")
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs["x"], labels),
                                             batch_size=len(labels))
        fim = FIM(case.model, loader, PMatDiag, variant="classif_logits", layer_collection=layers)
        diag = fim.get_diag()
        out, start = {}, 0
        for layer_id in layers.layers:
            module = dict(case.model.named_modules())[layer_id]
            prefix = by_module[id(module)]
            for attr in ("weight", "bias"):
                p = getattr(module, attr, None)
                if p is not None:
                    out[f"{prefix}.{attr}"] = diag[start:start + p.numel()].reshape(p.shape)
                    start += p.numel()
        return out
    return step


METHODS = {"train": train, "project": project, "torch_func": torch_func, "opacus": opacus, "backpack": backpack,
           "asdl": asdl, "nngeometry": nngeometry}


def compare(mine: dict, theirs: dict) -> tuple[float, float, str]:
    """(max relative error after one global scale, that scale, the worst tensor) over tensors with a
    non-negligible Fisher."""
    if not theirs or set(theirs) != set(mine):  # tensors missing (or extra): not the same quantity
        missing = sorted(set(mine) - set(theirs or {}))
        return float("inf"), float("nan"), f"{len(missing)} tensors missing, e.g. {missing[:1]}"
    a = torch.cat([theirs[n].double().reshape(-1) for n in mine])
    b = torch.cat([mine[n].double().reshape(-1) for n in mine])
    scale = float((a * b).sum() / (a * a).sum()) if float((a * a).sum()) > 0 else float("nan")
    top = max(float(v.abs().max()) for v in mine.values())
    errors = {n: float((theirs[n].double() * scale - v.double()).abs().max() / v.abs().max())
              for n, v in mine.items() if float(v.abs().max()) > 1e-6 * top}
    worst = max(errors, key=errors.get)
    return errors[worst], scale, worst


def run_case(case: Case, rounds: int, methods: list[str]) -> dict:
    steps, results = {}, {}
    reference = project(case)(*case.batches[0])
    for name in methods:
        try:  # each method gets its own copy: peers hook into (and extend) the modules they are given
            own = copy.deepcopy(case.model)
            step = METHODS[name](Case(case.name, own, case.batches, case.call, case.num_classes, case.added))
            if name == "train":
                results[name] = {"correct": True, "max_rel_err": 0.0}
            else:
                error, scale, worst = compare(reference, step(*case.batches[0]))
                results[name] = {"max_rel_err": error, "scale": scale, "worst_tensor": worst,
                                 "correct": error <= TOLERANCE}
            steps[name] = step
        except ImportError as err:
            results[name] = {"skipped": f"not installed ({err.name}): pip install -e '.[bench]'"}
        except Exception as err:  # noqa: BLE001 - a peer that refuses a model is a result
            results[name] = {"refused": f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"}
    times = {name: [] for name in steps}
    order = list(steps)
    for r in range(rounds + 1):
        inputs, labels = case.batches[(r % (len(case.batches) - 1)) + 1 if len(case.batches) > 1 else 0]
        for name in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            steps[name](inputs, labels)
            if r:
                times[name].append(time.perf_counter() - start)
    batch = len(case.batches[0][1])
    for name, seconds in times.items():
        results[name]["ex_per_s"] = batch / statistics.median(seconds)
    for row in results.values():
        if "ex_per_s" in row:
            row["x_train"] = row["ex_per_s"] / results["train"]["ex_per_s"]
            row["x_project"] = row["ex_per_s"] / results["project"]["ex_per_s"]
    return results


def fastest_correct_peer(results: dict) -> float:
    speeds = [r["ex_per_s"] for n, r in results.items() if n in PEERS and r.get("correct") and "ex_per_s" in r]
    return max(speeds) if speeds else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="mlp,minilm_c3,minilm_c2,vit_tiny")
    parser.add_argument("--json", default=None)
    parser.add_argument("--dry-run", action="store_true", help="check the arguments and exit (the docs test)")
    args = parser.parse_args()
    if args.dry_run:
        print("arguments accepted")
        return
    torch.set_num_threads(args.threads)
    from lightning_merge.allocator import keep_freed_memory

    keep_freed_memory()  # as `lightning-merge` runs; every method in this process alike
    makers = {"mlp": lambda: mlp_case(args.rounds + 1), "minilm_c3": lambda: minilm_case(args.rounds + 1, 3),
              "minilm_c2": lambda: minilm_case(args.rounds + 1, 2), "vit_tiny": lambda: vit_case(args.rounds + 1)}
    on = {"mlp": list(METHODS), "vit_tiny": list(METHODS)}
    report: dict = {"threads": args.threads, "rounds": args.rounds, "models": {}}
    for model in args.models.split(","):
        case = makers[model]()
        methods = on.get(model, ["train", "project", "torch_func", "opacus", "backpack", "asdl", "nngeometry"])
        results = run_case(case, args.rounds, methods)
        report["models"][model] = results
        print(f"\n{model}: examples/s, × a training step, × this project, max relative error vs this project")
        for name, row in results.items():
            if "ex_per_s" in row:
                verdict = "ok" if row["correct"] else "WRONG (not a competitor)"
                print(f"  {name:<11} {row['ex_per_s']:9.1f}  {row['x_train']:6.2f}× train  {row['x_project']:6.2f}× "
                      f"project  err {row['max_rel_err']:.1e} (scale {row.get('scale', 1.0):.3g}) {verdict}"
                      + ("" if row["correct"] else f": worst {row.get('worst_tensor')}"))
            else:
                print(f"  {name:<11} {row.get('skipped') or row.get('refused')}")
    models = report["models"]
    if "mlp" in models:
        report["mlp_vs_fastest_peer"] = models["mlp"]["project"]["ex_per_s"] / fastest_correct_peer(models["mlp"])
    if "minilm_c3" in models:
        report["minilm_c3_vs_fastest_correct_peer"] = (models["minilm_c3"]["project"]["ex_per_s"]
                                                       / fastest_correct_peer(models["minilm_c3"]))
    print(json.dumps({k: v for k, v in report.items() if k != "models"}))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
