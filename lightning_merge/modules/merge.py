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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveFloat
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_merge.atomic import check_writable
from lightning_merge.backbones import load_backbone
from lightning_merge.data.batch import EXAMPLE_INDEX, LABELS
from lightning_merge.evaluation.ensemble import ensemble_outputs
from lightning_merge.evaluation.results import write_completion_marker, write_results
from lightning_merge.fisher.io import read_fisher_metadata
from lightning_merge.fisher.provenance import check_provenance, fingerprint_tensors
from lightning_merge.merging.flat import FlatLayout, FlatMerger
from lightning_merge.merging.methods import FisherMerge, IsotropicMerge, MergeMethod
from lightning_merge.merging.search import CoefficientSearch, FixedCoefficients
from lightning_merge.merging.state_dicts import shared_body_names

UNMERGED, ENSEMBLE = "unmerged", "ensemble"
SELECT, HELDOUT, FULL = "select", "heldout", "full"
BEST, ALL = "best", "all"


@dataclass
class ModelSpec:
    """One model taking part in a merge.

    Attributes:
        path: an export directory of a fine-tune stage (or any folder ``load_backbone`` reads).
        fisher / mask_fisher: Fisher files of this model (for ``FisherMerge(fisher=...)``).
        data: the data module of this model's task; models with data are evaluated (under their own
            head), the others only contribute parameters (e.g. an intermediate-task donor).
        task: models with the same task share a label space: their heads are merged too, and they
            form the output ensemble. Default: the model's ``name``.
        name: labels this model's evaluation in result columns. Default: the data's task (GLUE) or
            source and shift (images), else the folder name.
        family: how to load ``path`` when it has no export manifest (``hf_text``, ``hf_mlm``,
            ``timm_vit``; default ``hf_text``), e.g. ``hf_mlm`` for a domain-adapted masked LM.
        allow_missing: this model lacks some of the other models' body tensors (a masked LM has no
            pooler); those are kept from each evaluated model instead of being an architecture error.
        check_provenance: refuse statistics files whose recorded model fingerprint is not this
            model's (set ``false`` only to pair a model with another checkpoint's statistics on purpose).
    """

    path: str
    fisher: str | None = None
    mask_fisher: str | None = None
    data: pl.LightningDataModule | None = None
    task: str | None = None
    name: str | None = None
    family: str | None = None
    allow_missing: bool = False
    check_provenance: bool = True


def _under(root: str, path: str | None) -> str | None:
    return None if path is None else str(Path(root) / path)  # an absolute `path` stays as it is


def _input_under(root: str, path: str | None) -> str | None:
    """An input under ``root`` if it is there; otherwise as given (a hub id such as
    ``textattack/bert-base-uncased-MNLI``, or a path relative to the working directory)."""
    rooted = _under(root, path)
    return rooted if rooted is not None and Path(rooted).exists() else path


def _rooted(spec: ModelSpec, root: str) -> ModelSpec:
    return replace(spec, path=_input_under(root, spec.path), fisher=_input_under(root, spec.fisher),
                   mask_fisher=_input_under(root, spec.mask_fisher))


@dataclass
class _Candidate:
    method: str
    coefficients: list[float] | None  # None for baselines
    units: list[tuple[int, int, str]] = field(default_factory=list)  # (spec, eval set, part)
    resolved_from: str | None = None  # "best of <method>": coefficients chosen at run time


class MergeModule(pl.LightningModule):
    """Merge ``models`` with each of ``methods`` over ``search``'s coefficients and evaluate.

    Args:
        models: the model specs (2..N), the ``target`` among them (index).
        methods: merge methods (default: isotropic, plus Fisher when every model has ``fisher``,
            plus mask Fisher when every model has ``mask_fisher``).
        search: coefficient candidates (default: equal weights).
        select_examples: how many evaluation examples (from the start of each task's set) select the
            coefficients; a value below 1 is a fraction of the set. The rest is the held-out part.
        report: ``best`` (each method's selected candidate gets held-out and other-set scores) or
            ``all`` (every candidate is scored everywhere: WiSE-FT curves, NeurIPS paper §3.2).
        baselines: any of ``unmerged`` (every evaluated model alone) and ``ensemble`` (averaged
            output probabilities of the models of a task, fig. 2).
        output_dir: where ``results.csv/json``, ``search.csv`` and the plots go.
        export_dir: export the best merged model there (in its native format), chosen by selection
            score among ``export_method`` (default: all methods).
        root_dir: relative paths are taken relative to it (models and Fishers when they exist there,
            so hub ids still work; always ``output_dir`` and ``export_dir``), so a recipe's config can
            name its stages' outputs and a run can move them.
    """

    def __init__(self, models: list[ModelSpec], methods: list[MergeMethod] | None = None,
                 search: CoefficientSearch | None = None, target: NonNegativeInt = 0,
                 select_examples: PositiveFloat = 2048, report: Literal["best", "all"] = BEST,
                 baselines: list[Literal["unmerged", "ensemble"]] | None = None, output_dir: str = "merge_results",
                 export_dir: str | None = None, export_method: str | None = None, plot: bool = True,
                 root_dir: str | None = None) -> None:
        super().__init__()
        if root_dir is not None:
            models = [_rooted(spec, root_dir) for spec in models]
            output_dir, export_dir = _under(root_dir, output_dir), _under(root_dir, export_dir)
        if len(models) < 2:
            raise ValueError(f"merging needs at least 2 models, got {len(models)}")
        if not 0 <= target < len(models):
            raise ValueError(f"MergeModule(target={target}): out of range for {len(models)} models "
                             f"(0..{len(models) - 1})")
        if report not in (BEST, ALL):
            raise ValueError(f"report must be {BEST!r} or {ALL!r}, got {report!r}")
        baselines = [UNMERGED, ENSEMBLE] if baselines is None else list(baselines)
        unknown = [b for b in baselines if b not in (UNMERGED, ENSEMBLE)]
        if unknown:
            raise ValueError(f"Unknown baselines {unknown}; choose from {[UNMERGED, ENSEMBLE]}")
        if select_examples <= 0:
            raise ValueError(f"select_examples must be > 0, got {select_examples}")
        if not any(spec.data is not None for spec in models):
            raise ValueError("no model has `data`: give the evaluation data of at least one model's task")
        self.specs, self.target = list(models), target
        self.methods = list(methods) if methods is not None else self._default_methods()
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"merge methods need distinct names, got {names}")
        for method in self.methods:
            field_name = method.fisher_field
            missing = [i for i, s in enumerate(self.specs) if field_name and not getattr(s, field_name)]
            if missing:
                raise ValueError(f"{method.name} needs `{method.fisher_field}` for every model; models {missing} "
                                 f"({[self.specs[i].path for i in missing]}) have none")
        self.search = search or FixedCoefficients()
        self.search.candidates(len(models), target)  # a wrong count is found now, before any model is loaded
        if export_method is not None and export_method not in names:
            raise ValueError(f"MergeModule(export_method={export_method!r}): not one of the methods {names}")
        self.select_examples, self.report, self.baselines = select_examples, report, baselines
        self.output_dir, self.export_dir, self.export_method, self.plot = output_dir, export_dir, export_method, plot
        self.backbones = nn.ModuleList()
        self._prepared = False

    def _default_methods(self) -> list[MergeMethod]:
        methods: list[MergeMethod] = [IsotropicMerge()]
        for field_name in ("fisher", "mask_fisher"):
            if all(getattr(s, field_name) for s in self.specs):
                methods.append(FisherMerge(fisher=field_name))
        return methods

    # -- set-up: models, Fishers, evaluation sets --------------------------------------------------
    def setup(self, stage: str) -> None:
        if self._prepared:
            return
        if self._trainer is None or self.trainer.is_global_zero:  # found now, not after the whole evaluation
            check_writable(self.output_dir, "merge results")
            if self.export_dir:
                check_writable(Path(self.export_dir).parent, "merged model")
        self.stage = stage
        self.backbones = nn.ModuleList(load_backbone(s.path, s.family) for s in self.specs)
        for backbone in self.backbones:
            backbone.requires_grad_(False).eval()
        self.names = self._names()
        self.tasks = [s.task or name for s, name in zip(self.specs, self.names)]
        self.evaluated = [i for i, s in enumerate(self.specs) if s.data is not None]
        for i in self.evaluated:
            self._setup_data(i, stage)
        self._setup_merge()
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

    def _names(self) -> list[str]:
        names = []
        for spec in self.specs:
            name = spec.name
            if name is None and spec.data is not None:
                task = getattr(spec.data, "task", None)
                hp = getattr(spec.data, "hparams", {})
                name = getattr(task, "name", None) or "_".join(
                    str(x) for x in (hp.get("source"), hp.get("train_shift")) if x)
            names.append(name or Path(spec.path).name)
        # Evaluated names must not collide: they key the result columns.
        return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]

    def _setup_data(self, i: int, stage: str) -> None:
        data, backbone = self.specs[i].data, self.backbones[i]
        data.attach_model(backbone)
        data.setup(stage)
        if data.num_labels != backbone.num_labels:
            raise ValueError(f"Model {i} ({self.specs[i].path}) has {backbone.num_labels} outputs but its data "
                             f"({self.names[i]}) has {data.num_labels} labels")
        preprocessing = getattr(data, "preprocessing", None)
        backbone.describe_task(getattr(data, "label_names", None), preprocessing() if callable(preprocessing) else None)

    def _setup_merge(self) -> None:
        """Flat buffers of every model's merged tensors, shared by all methods."""
        shared_task = len(set(self.tasks)) == 1
        head_names = set() if shared_task else {n for b in self.backbones for n in b.head_parameter_names()}
        states = [{n: p.detach() for n, p in b.model.named_parameters()} for b in self.backbones]
        names = self._merged_names(states, head_names)
        shapes = {n: states[self.target][n].shape for n in names}
        self.layout = FlatLayout(shapes)
        self.thetas = [self.layout.flatten(s) for s in states]
        # One output buffer for all methods: candidates are merged (and copied out) one at a time.
        self.merged = torch.empty(self.layout.numel, dtype=torch.float32)
        self._check_provenance(states)
        self.mergers = {}
        for method in self.methods:
            weights = None
            if method.fisher_field is not None:
                weights = [method.load_weights(getattr(s, method.fisher_field), shapes, f"model {i}")
                           for i, s in enumerate(self.specs)]
            self.mergers[method.name] = FlatMerger(method, self.thetas, self.layout, weights, self.target,
                                                   out=self.merged)
        rank_zero_info(f"Merging {len(names)} tensors ({self.layout.numel / 1e6:.1f}M values) of {len(self.specs)} "
                       f"models with {[m.name for m in self.methods]}"
                       f"{'' if shared_task else '; each task keeps its own head'}")

    def _check_provenance(self, states) -> None:
        """Each statistics file must come from the model it is paired with (its recorded fingerprint)."""
        fields = {m.fisher_field for m in self.methods if m.fisher_field is not None}
        for i, spec in enumerate(self.specs):
            for field_name in sorted(fields):
                path = getattr(spec, field_name)
                if not spec.check_provenance or path is None:
                    continue
                note = check_provenance(read_fisher_metadata(path), lambda names, s=states[i]: fingerprint_tensors(
                    {n: s[n] for n in names if n in s}), f"{field_name} file {path}", f"model {i} ({spec.path})")
                if note:
                    rank_zero_warn(note)

    def _merged_names(self, states, head_names) -> list[str]:
        partial = [i for i, spec in enumerate(self.specs) if spec.allow_missing]
        if not partial:
            return shared_body_names(states, head_names)
        complete = [s for i, s in enumerate(states) if i not in partial]
        names = shared_body_names(complete, head_names) if len(complete) > 1 else \
            sorted(set(complete[0]) - set(head_names))
        kept = sorted(n for n in names if any(n not in states[i] for i in partial))
        names = [n for n in names if n not in kept]
        if not names:
            raise ValueError("the models share no body tensor: nothing to merge")
        for i in partial:
            wrong = [n for n in names if states[i][n].shape != states[self.target][n].shape]
            if wrong:
                raise ValueError(f"Model {i} ({self.specs[i].path}) differs in shape: {wrong[:5]}")
        if kept:
            rank_zero_info(f"Not in every model, kept as they are: {kept[:8]}{' ...' if len(kept) > 8 else ''}")
        return names

    def _split(self, i: int) -> tuple[list[int], list[int], list[list[int]]]:
        data = self.specs[i].data
        n = data.eval_size(0, self.stage)
        k = int(self.select_examples) if self.select_examples >= 1 else int(round(self.select_examples * n))
        k = min(max(k, 1), n)
        if k == n:
            rank_zero_warn(f"{self.names[i]}: all {n} evaluation examples select the coefficients, none is held "
                           f"out; the held-out score is empty and the full score is optimistic "
                           f"(lower select_examples)")
        others = [list(range(data.eval_size(s, self.stage))) for s in range(1, len(data.eval_set_names))]
        return list(range(k)), list(range(k, n)), others

    def _plan(self) -> None:
        """The candidates and, in dataloader order, what each evaluation dataloader evaluates."""
        self.splits = {i: self._split(i) for i in self.evaluated}
        sets = {i: len(self.specs[i].data.eval_set_names) for i in self.evaluated}
        selection = [(i, 0, SELECT) for i in self.evaluated]
        rest = [(i, 0, HELDOUT) for i in self.evaluated if self.splits[i][1]]
        rest += [(i, s, FULL) for i in self.evaluated for s in range(1, sets[i])]
        self.candidates: list[_Candidate] = []
        for baseline in self.baselines:
            if baseline == ENSEMBLE and all(self.tasks.count(self.tasks[i]) < 2 for i in self.evaluated):
                rank_zero_info("No output-ensemble baseline: no evaluated task has two models (set `task` to "
                               "mark models that share a label space)")
                continue
            self.candidates.append(_Candidate(baseline, None, selection + rest))
        coefficient_sets = self.search.candidates(len(self.specs), self.target)
        for method in self.methods:
            for lam in coefficient_sets:
                self.candidates.append(_Candidate(method.name, lam, selection + (rest if self.report == ALL else [])))
        if self.report == BEST and rest:
            for method in self.methods:
                self.candidates.append(_Candidate(method.name, None, rest, resolved_from=method.name))
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
        self.thetas = [t.to(self.device) for t in self.thetas]
        self.merged = self.merged.to(self.device)
        for merger in self.mergers.values():
            merger.thetas, merger.out = self.thetas, self.merged  # shared: moved once, not per method
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

    def _best(self, method: str) -> int:
        """The candidate of ``method`` with the highest selection score (the first one on ties)."""
        pool = [c for c, cand in enumerate(self.candidates) if cand.method == method and cand.resolved_from is None]
        scores = [self._selection_score(c) for c in pool]
        return pool[max(range(len(pool)), key=lambda k: (not math.isnan(scores[k]), scores[k], -k))]

    def _row(self, c: int, rest: int | None = None) -> dict[str, object]:
        """Reported numbers of candidate ``c``; ``rest`` is the candidate that scored its held-out and
        other sets (its own run after selection), if not ``c`` itself."""
        rest = c if rest is None else rest
        cand = self.candidates[c]
        row: dict[str, object] = {"method": cand.method, "coefficients": cand.coefficients}
        selection, heldout, full = [], [], []
        for i in self.evaluated:
            task = self.names[i]
            selection.append(self._metrics(i, 0, [(c, SELECT)])["score"])
            heldout.append(self._metrics(i, 0, [(rest, HELDOUT)])["score"])
            values = self._metrics(i, 0, [(c, SELECT), (rest, HELDOUT)])
            full.append(values["score"])
            row.update({f"{task}/{k}": v for k, v in values.items()})
            for s, set_name in enumerate(self.specs[i].data.eval_set_names[1:], start=1):
                row.update({f"{task}/{set_name}/{k}": v for k, v in self._metrics(i, s, [(rest, FULL)]).items()})
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        row.update(selection_score=mean(selection), heldout_score=mean(heldout), full_score=mean(full))
        return row

    def _results(self) -> tuple[list[dict], list[dict]]:
        searched = [c for c, cand in enumerate(self.candidates) if cand.method not in self.baselines
                    and cand.resolved_from is None]
        search = [{"method": self.candidates[c].method, "coefficients": self.candidates[c].coefficients,
                   "selection_score": self._selection_score(c)} for c in searched]
        rows = [self._row(c) for c, cand in enumerate(self.candidates) if cand.method in self.baselines]
        for method in self.methods:
            pool = [c for c, cand in enumerate(self.candidates) if cand.method == method.name
                    and cand.resolved_from is None]
            if self.report == ALL:
                rows += [self._row(c) for c in pool]
            else:
                rest = next((c for c, cand in enumerate(self.candidates) if cand.resolved_from == method.name), None)
                rows.append(self._row(self._best(method.name), rest))
        return search, rows

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
            written = write_results(self.output_dir, rows, search, self.target, self.plot)
            rank_zero_info("Merge results:\n" + written)
            exported = self._export(search) if self.export_dir else []
            marker = write_completion_marker(self.output_dir, rows, search, {**facts, "exported": exported})
            rank_zero_info(f"Wrote {marker.parent}/ (results.csv, search.csv, plots, results.json)"
                           + (f" and the merged model to {', '.join(exported)}" if exported else ""))
        self.trainer.strategy.barrier()
        self.outputs.clear()

    def on_validation_epoch_end(self) -> None:
        self._finish()

    on_test_epoch_end = on_validation_epoch_end

    def _export(self, search: list[dict]) -> list[str]:
        pool = [r for r in search if self.export_method in (None, r["method"])]
        if not pool:
            raise ValueError(f"export_method {self.export_method!r} is not one of {[m.name for m in self.methods]}")
        best = max(pool, key=lambda r: (not math.isnan(r["selection_score"]), r["selection_score"]))
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
