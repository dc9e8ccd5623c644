"""Stage 4: merge fine-tuned models and evaluate the result (``lightning-merge validate`` / ``test``).

One run evaluates, candidate after candidate, every merging method's coefficient candidates on the
*selection* examples (the first ``select_examples`` of each task's evaluation set), picks each method's
best candidate there, and only then scores that candidate on the *held-out* rest, so the number a
table reports was not the one used to pick it. The baselines (each model unmerged, output ensembling)
go into the same table. Lightning drives the loop: each (candidate, task, part) is one evaluation
dataloader, run in order, so a candidate is merged once (at its first batch) and evaluated under
inference mode at the model's plain inference throughput, on any device or strategy.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_merge.atomic import check_writable
from lightning_merge.data.batch import EXAMPLE_INDEX, LABELS
from lightning_merge.data.protocol import EvaluationData
from lightning_merge.evaluation.ensemble import ensemble_outputs
from lightning_merge.evaluation.results import write_completion_marker, write_results
from lightning_merge.evaluation.selection import (
    BEST,
    ENSEMBLE,
    HELDOUT,
    SELECT,
    UNMERGED,
    best_candidate,
    plan_candidates,
    result_tables,
    split_selection,
)
from lightning_merge.merging.base import BASE, CONVEX, MergeMethod
from lightning_merge.merging.flat import FlatLayout, FlatMerger
from lightning_merge.merging.methods import FisherMerge, IsotropicMerge
from lightning_merge.merging.search import CoefficientSearch, FixedCoefficients, ScaleSearch
from lightning_merge.modules.model_pool import (
    LEGACY_INPUTS,
    ModelPool,
    ModelSpec,
    input_under,
    rooted,
    under,
    with_shared_data,
)

__all__ = ["MergeModule", "ModelSpec"]


class MergeModule(pl.LightningModule):
    """Merge ``models`` with each of ``methods`` over their coefficient candidates and evaluate.

    Args:
        models: the model specs (2..N), the ``target`` among them (index).
        methods: merge methods (default: isotropic, plus Fisher when every model has ``fisher``,
            plus mask Fisher when every model has ``mask_fisher``). Each reads what it declares: its
            per-model inputs from the specs, ``base`` from here.
        base: the pre-trained model the others were fine-tuned from (task arithmetic, TIES, DARE).
        search: coefficient candidates of averaging methods (default: equal weights).
        scale_search: coefficient candidates of task-vector methods, whose ``λ`` are scales
            (default: :class:`ScaleSearch`, one shared scale from 0.1 to 1.5).
        select_examples: how many evaluation examples (from the start of each task's set) select the
            coefficients; a value below 1 is a fraction of the set. The rest is the held-out part.
        report: ``best`` (each method's selected candidate gets held-out and other-set scores) or
            ``all`` (every candidate is scored everywhere: WiSE-FT curves, NeurIPS paper §3.2).
        heldout_curves: with ``best``, also score every searched candidate on the held-out part, so
            ``search.csv`` and ``score_vs_lambda.png`` show held-out beside selection scores (what the
            selection would have found on unseen data). Selection still reads the selection part only;
            it costs the held-out part's evaluation per candidate.
        baselines: any of ``unmerged`` (every evaluated model alone) and ``ensemble`` (averaged
            output probabilities of the models of a task, fig. 2).
        output_dir: where ``results.csv/json``, ``search.csv`` and the plots go.
        export_dir: export the best merged model there (in its native format), chosen by selection
            score among ``export_method`` (default: all methods).
        data: the evaluation data of the models whose spec gives none (``data_for``), so a recipe's config
            lists its models once and a run picks the task with ``--model.init_args.data.init_args.task``.
        data_for: ``target`` (the target model only: an intermediate-task donor is not evaluated) or
            ``all`` (every model without data of its own, e.g. the seeds of one task when ensembling).
        root_dir: relative paths are taken relative to it (models, base and statistics when they exist
            there, so hub ids still work; always ``output_dir`` and ``export_dir``), so a recipe's config
            can name its stages' outputs and a run can move them.
    """

    def __init__(self, models: list[ModelSpec], methods: list[MergeMethod] | None = None, base: str | None = None,
                 search: CoefficientSearch | None = None, scale_search: CoefficientSearch | None = None,
                 target: NonNegativeInt = 0, select_examples: PositiveFloat = 2048,
                 report: Literal["best", "all"] = BEST, heldout_curves: bool = False,
                 baselines: list[Literal["unmerged", "ensemble"]] | None = None, output_dir: str = "merge_results",
                 export_dir: str | None = None, export_method: str | None = None, plot: bool = True,
                 data: pl.LightningDataModule | None = None, data_for: Literal["target", "all"] = "target",
                 root_dir: str | None = None) -> None:
        super().__init__()
        if root_dir is not None:
            models = [rooted(spec, root_dir) for spec in models]
            output_dir, export_dir = under(root_dir, output_dir), under(root_dir, export_dir)
            base = input_under(root_dir, base)
        if len(models) < 2:
            raise ValueError(f"merging needs at least 2 models, got {len(models)}")
        if not 0 <= target < len(models):
            raise ValueError(f"MergeModule(target={target}): out of range for {len(models)} models "
                             f"(0..{len(models) - 1})")
        models = with_shared_data(models, data, data_for, target)
        baselines = [UNMERGED, ENSEMBLE] if baselines is None else list(baselines)
        if not any(spec.data is not None for spec in models):
            raise ValueError("no model has `data`: give the evaluation data of at least one model's task "
                             "(a model's `data`, or `data` beside `models` for the target)")
        self.specs, self.target, self.base = list(models), target, base
        self.methods = list(methods) if methods is not None else self._default_methods()
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"merge methods need distinct names, got {names}")
        self._check_declared_inputs()
        for i, spec in enumerate(self.specs):
            if spec.data is not None and not isinstance(spec.data, EvaluationData):
                raise ValueError(f"model {i} ({spec.path}): {type(spec.data).__name__} is not evaluation data: it "
                                "needs attach_model, setup, task_metrics, eval_size and eval_loader "
                                "(lightning_merge.data.protocol.EvaluationData)")
        self.search = search or FixedCoefficients()
        self.scale_search = scale_search or ScaleSearch()
        for method in self.methods:  # a wrong count is found now, before any model is loaded
            self._search_of(method).candidates(len(models), target)
        if export_method is not None and export_method not in names:
            raise ValueError(f"MergeModule(export_method={export_method!r}): not one of the methods {names}")
        self.select_examples, self.report, self.baselines = select_examples, report, baselines
        self.heldout_curves = heldout_curves
        self.output_dir, self.export_dir, self.export_method, self.plot = output_dir, export_dir, export_method, plot
        self.backbones = nn.ModuleList()
        self._prepared = False

    def _default_methods(self) -> list[MergeMethod]:
        methods: list[MergeMethod] = [IsotropicMerge()]
        for key in LEGACY_INPUTS:
            if all(s.input(key) for s in self.specs):
                methods.append(FisherMerge(fisher=key))
        return methods

    def _check_declared_inputs(self) -> None:
        for method in self.methods:
            for key in method.model_inputs:
                missing = [i for i, s in enumerate(self.specs) if not s.input(key)]
                if missing:
                    raise ValueError(f"{method.name} needs `{key}` for every model; models {missing} "
                                     f"({[self.specs[i].path for i in missing]}) have none")
            if BASE in method.shared_inputs and self.base is None:
                raise ValueError(f"{method.name} needs `base`: the pre-trained model the merged models were "
                                 f"fine-tuned from (MergeModule(base=...))")

    def _search_of(self, method: MergeMethod) -> CoefficientSearch:
        return self.search if method.coefficients == CONVEX else self.scale_search

    # -- set-up: models, statistics, evaluation sets ------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._prepared:
            return
        if self._trainer is None or self.trainer.is_global_zero:  # found now, not after the whole evaluation
            check_writable(self.output_dir, "merge results")
            if self.export_dir:
                check_writable(Path(self.export_dir).parent, "merged model")
        self.stage = stage
        pool = ModelPool(self.specs, self.target, self.base)
        self.backbones = nn.ModuleList(pool.backbones)
        self.names, self.tasks, self.evaluated = pool.names, pool.tasks, pool.evaluated
        for i in self.evaluated:
            self._setup_data(i, stage)
        self._setup_merge(pool)
        self._plan()
        self._release_unused_models()
        self._prepared = True

    def _release_unused_models(self) -> None:
        """Once flattened, a model that is neither evaluated nor an ensemble member is only needed as
        a row of ``self.thetas``: drop its module so it is not kept (or moved to the device) twice."""
        ensembled = any(c.method == ENSEMBLE for c in self.candidates)
        needed = {j for i in self.evaluated for j in range(len(self.specs))
                  if j == i or (ensembled and self.tasks[j] == self.tasks[i])}
        for j in range(len(self.specs)):
            if j not in needed:
                self.backbones[j] = nn.Identity()

    def _setup_data(self, i: int, stage: str) -> None:
        data, backbone = self.specs[i].data, self.backbones[i]  # connected by the pool (connect_data)
        data.setup(stage)
        if data.num_labels != backbone.num_labels:
            raise ValueError(f"Model {i} ({self.specs[i].path}) has {backbone.num_labels} outputs but its data "
                             f"({self.names[i]}) has {data.num_labels} labels")

    def _setup_merge(self, pool: ModelPool) -> None:
        """Flat buffers of every model's merged tensors, shared by all methods, and one merge plan per
        method (its declared inputs validated and read once)."""
        self.layout = FlatLayout({n: pool.states[self.target][n].shape for n in pool.merged_names})
        self.thetas = [self.layout.flatten(s) for s in pool.states]
        base = pool.base_state() if any(BASE in m.shared_inputs for m in self.methods) else None
        shared = {} if base is None else {BASE: self._flatten_base(base)}
        # One output buffer for all methods: candidates are merged (and copied out) one at a time.
        self.merged = torch.empty(self.layout.numel, dtype=torch.float32)
        self.mergers = {}
        for method in self.methods:
            inputs = {key: pool.inputs(key) for key in method.model_inputs}
            self.mergers[method.name] = FlatMerger(
                method, self.thetas, self.layout, inputs, {k: v for k, v in shared.items() if k in
                                                           method.shared_inputs},
                self.target, out=self.merged, states=pool.states,
                check_provenance=[s.check_provenance for s in self.specs],
                labels=[f"model {i} ({s.path})" for i, s in enumerate(self.specs)])
            # Global passes (norms, TIES thresholds) now: their errors come before any evaluation.
            self.mergers[method.name].plan.prepare()
        rank_zero_info(f"Merging {len(self.layout.names)} tensors ({self.layout.numel / 1e6:.1f}M values) of "
                       f"{len(self.specs)} models with {[m.name for m in self.methods]}"
                       f"{'' if pool.shared_task else '; each task keeps its own head'}")

    def _flatten_base(self, base: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.layout.names if n not in base]
        wrong = [n for n in self.layout.names if n in base and base[n].shape != self.layout.shapes[n]]
        if missing or wrong:
            raise ValueError(f"base {self.base} does not match the merged models: it lacks {missing[:5]} and differs "
                             f"in shape at {wrong[:5]}")
        return self.layout.flatten(base)

    def _plan(self) -> None:
        """The candidates and, in dataloader order, what each evaluation dataloader evaluates."""
        self.splits = {}
        for i in self.evaluated:
            data = self.specs[i].data
            n = data.eval_size(0, self.stage)
            select, heldout = split_selection(n, self.select_examples)
            if not heldout:
                rank_zero_warn(f"{self.names[i]}: all {n} evaluation examples select the coefficients, none is "
                               f"held out; the held-out score is empty and the full score is optimistic "
                               f"(lower select_examples)")
            others = [list(range(data.eval_size(s, self.stage))) for s in range(1, len(data.eval_set_names))]
            self.splits[i] = (select, heldout, others)
        baselines = list(self.baselines)
        if ENSEMBLE in baselines and all(self.tasks.count(self.tasks[i]) < 2 for i in self.evaluated):
            rank_zero_info("No output-ensemble baseline: no evaluated task has two models (set `task` to "
                           "mark models that share a label space)")
            baselines.remove(ENSEMBLE)
        self.candidates = plan_candidates(
            [(m.name, self._search_of(m).candidates(len(self.specs), self.target)) for m in self.methods],
            baselines, self.evaluated, {i: len(self.specs[i].data.eval_set_names) for i in self.evaluated},
            {i: bool(self.splits[i][1]) for i in self.evaluated}, self.report, self.heldout_curves)
        self.loader_units = [(c, unit) for c, cand in enumerate(self.candidates) for unit in cand.units]
        self._loaded: dict[int, int | str] = {}
        self._new_run()

    def _new_run(self) -> None:
        """Forget one evaluation run's outputs and decisions (a module can be validated more than once)."""
        self.outputs: dict[tuple[int, int, int, str], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        self._collected: dict = {}  # gathered outputs; final once gathered, so cached for the run
        self._selection_scores: dict[int, float] = {}
        self.merge_seconds = 0.0  # time spent merging inside the evaluation loop (reported in the facts)
        for candidate in self.candidates:
            if candidate.resolved_from is not None:
                candidate.coefficients = None

    def _loaders(self):
        loaders = []
        for _, (i, s, part) in self.loader_units:
            select, heldout, others = self.splits[i]
            indices = select if part == SELECT else heldout if part == HELDOUT else others[s - 1]
            loaders.append(self.specs[i].data.eval_loader(indices, s, self.stage))
        return loaders

    def val_dataloader(self):
        return self._loaders()

    test_dataloader = val_dataloader

    # -- evaluation ------------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        self._new_run()
        self._to_device()

    on_test_start = on_validation_start

    def _to_device(self) -> None:
        if self.merged.device == self.device:
            return
        self.thetas = [t.to(self.device) for t in self.thetas]
        self.merged = self.merged.to(self.device)
        for merger in self.mergers.values():  # the shared buffers are moved once, not per method
            merger.thetas, merger.out = self.thetas, self.merged
            merger.to(self.device)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        c, (i, s, part) = self.loader_units[dataloader_idx]
        candidate = self.candidates[c]
        if candidate.method == ENSEMBLE:
            members = [j for j in range(len(self.specs)) if self.tasks[j] == self.tasks[i]]
            for j in members:
                self._load(j, UNMERGED)
            logits = ensemble_outputs([self.backbones[j](batch) for j in members])
        else:
            self._load(i, c)
            logits = self.backbones[i](batch)
        self.outputs.setdefault((c, i, s, part), []).append(
            (logits.detach().float(), batch[LABELS].detach(), batch[EXAMPLE_INDEX].detach()))

    test_step = validation_step

    def _load(self, i: int, c: int | str) -> None:
        """Put candidate ``c``'s parameters (merged, or model ``i``'s own for the unmerged baseline) into
        model ``i``, unless they are already there. Candidates run one after another, so each is merged
        once, at its first batch."""
        if c == UNMERGED or self.candidates[c].method == UNMERGED:
            c = UNMERGED
        if self._loaded.get(i) == c:
            return
        if c == UNMERGED:
            values = self.layout.unflatten(self.thetas[i])
        else:
            candidate = self.candidates[c]
            if candidate.coefficients is None:  # "best of <method>": decided by the selection scores so far
                candidate.coefficients = self.candidates[self._best(candidate.resolved_from)].coefficients
            start = time.perf_counter()
            values = self.mergers[candidate.method](candidate.coefficients)
            self.merge_seconds += time.perf_counter() - start
        params = dict(self.backbones[i].model.named_parameters())
        torch._foreach_copy_([params[n] for n in values], list(values.values()))
        self._loaded[i] = c

    # -- scores ----------------------------------------------------------------------------------
    def _collect(self, key: tuple[int, int, int, str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of one (candidate, model, set, part), each example once even on several
        devices (a distributed sampler pads the last batches with repeats). Collective on several
        devices: every rank asks for the same keys in the same order."""
        if key in self._collected:
            return self._collected[key]
        logits, labels, index = (torch.cat(x) for x in zip(*self.outputs[key]))
        if self.trainer.world_size > 1:
            logits, labels, index = (self.all_gather(x).flatten(0, 1) for x in (logits, labels, index))
        order = torch.sort(index, stable=True).indices
        first = torch.ones_like(order, dtype=torch.bool)
        first[1:] = index[order][1:] != index[order][:-1]
        keep = order[first]
        self._collected[key] = (logits[keep].cpu(), labels[keep].cpu())
        return self._collected[key]

    def _metrics(self, i: int, s: int, parts: list[tuple[int, str]]) -> dict[str, float]:
        """Task metrics of model ``i`` on set ``s`` over the given (candidate, part) outputs."""
        metrics = self.specs[i].data.task_metrics()
        seen = 0
        for c, part in parts:
            if (c, i, s, part) in self.outputs:
                logits, labels = self._collect((c, i, s, part))
                metrics.update(logits, labels)
                seen += len(labels)
        if seen == 0:
            return {"score": math.nan}
        return {k: float(v) for k, v in metrics.compute().items()}

    def _selection_score(self, c: int) -> float:
        if c not in self._selection_scores:  # asked for again by _best, the search table and the rows
            self._selection_scores[c] = sum(self._metrics(i, 0, [(c, SELECT)])["score"]
                                            for i in self.evaluated) / len(self.evaluated)
        return self._selection_scores[c]

    def _prefer(self, candidate) -> float:
        """On tied selection scores: averaging methods prefer the target's largest weight (the unmerged
        end: no evidence for moving away from it); task-vector methods the smallest scale (the first)."""
        method = next(m for m in self.methods if m.name == candidate.method)
        return candidate.coefficients[self.target] if method.coefficients == CONVEX else 0.0

    def _best(self, method: str) -> int:
        return best_candidate(self.candidates, method, self._selection_score, self._prefer)

    def _results(self) -> tuple[list[dict], list[dict]]:
        return result_tables(self.candidates, [m.name for m in self.methods], self.baselines, self.report,
                             self.evaluated, self.names,
                             {i: self.specs[i].data.eval_set_names for i in self.evaluated},
                             lambda i, s, parts: self._metrics(i, s, parts), self._selection_score, self._prefer)

    def _finish(self) -> None:
        search, rows = self._results()
        if self.logger is not None:
            # Straight to the logger: `self.log` at epoch end would be repeated for each of the
            # (candidates × tasks) dataloaders in Lightning's printed summary.
            for row in rows:
                name = row["method"] if self.report == BEST or row["coefficients"] is None else \
                    f"{row['method']}@{row['coefficients'][self.target]:.3g}"
                self.logger.log_metrics({f"{name}/{k}": float(v) for k, v in row.items()
                                         if isinstance(v, float) and not math.isnan(v)})
        if self.trainer.is_global_zero:
            facts = {"target": self.target, "models": [s.path for s in self.specs], "names": self.names,
                     "tasks": self.tasks,
                     "selection_examples": {self.names[i]: len(self.splits[i][0]) for i in self.evaluated},
                     "heldout_examples": {self.names[i]: len(self.splits[i][1]) for i in self.evaluated},
                     "stage": self.stage, "report": self.report, "merge_seconds": self.merge_seconds}
            one_task = len({self.tasks[i] for i in self.evaluated}) == 1
            written = write_results(self.output_dir, rows, search, self.target, self.plot, one_task)
            rank_zero_info("Merge results:\n" + written)
            exported = self._export(search) if self.export_dir else []
            marker = write_completion_marker(self.output_dir, rows, search, {**facts, "exported": exported})
            self.summary = (f"wrote {marker.parent}/ (results.csv, search.csv, plots, results.json)"
                            + (f" and the merged model to {', '.join(exported)}" if exported else ""))
            rank_zero_info(self.summary[0].upper() + self.summary[1:])
        self.trainer.strategy.barrier()
        self.outputs.clear()

    def on_validation_epoch_end(self) -> None:
        self._finish()

    on_test_epoch_end = on_validation_epoch_end

    def _export(self, search: list[dict]) -> list[str]:
        # Each method's selected candidate (the same the table reports), then the best of those.
        chosen = [self.candidates[self._best(m.name)] for m in self.methods if self.export_method in (None, m.name)]
        scores = [self._selection_score(self.candidates.index(c)) for c in chosen]
        k = max(range(len(chosen)), key=lambda j: (not math.isnan(scores[j]), scores[j], -j))
        best = {"method": chosen[k].method, "coefficients": chosen[k].coefficients}
        values = self.mergers[best["method"]](best["coefficients"])
        written = []
        for i in self.evaluated:
            params = dict(self.backbones[i].model.named_parameters())
            torch._foreach_copy_([params[n] for n in values], list(values.values()))
            self._loaded.pop(i, None)
            directory = Path(self.export_dir)
            if len(self.evaluated) > 1:
                directory = directory / self.names[i]
            self.backbones[i].export(directory)
            written.append(str(directory))
            rank_zero_info(f"Exported {best['method']} merge (coefficients {best['coefficients']}) of "
                           f"{self.names[i]} to {directory}")
        return written
