"""The models of a merge run: specs (paths, statistics, evaluation data) → loaded backbones, the names
that label them, which tensors are merged, and what each method reads for every model."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_merge.backbones import Backbone, load_backbone
from lightning_merge.merging.state_dicts import shared_body_names
from lightning_merge.modules.stage_data import connect_data

LEGACY_INPUTS = ("fisher", "mask_fisher")  # spec keys kept for YAML written before `inputs` existed


@dataclass
class ModelSpec:
    """One model taking part in a merge.

    Attributes:
        path: an export directory of a fine-tune stage (or any folder ``load_backbone`` reads).
        inputs: this model's statistics files by name, as merge methods declare them (``fisher``,
            ``mask_fisher``, ``gram``, ...). ``fisher`` / ``mask_fisher`` may also be given as keys of
            their own.
        data: the data module of this model's task; models with data are evaluated (under their own
            head), the others only contribute parameters (e.g. an intermediate-task donor).
        task: models with the same task share a label space: their heads are merged too, and they
            form the output ensemble. Default: the model's ``name``.
        name: labels this model's evaluation in result columns. Default: the data's task (GLUE) or
            source and shift (images), else the folder name.
        family: how to load ``path`` when it has no export manifest (``hf_text``, ``hf_mlm``,
            ``timm_vit``; default ``hf_text``), e.g. ``hf_mlm`` for a domain-adapted masked LM.
        backbone_args: further constructor arguments of the family, e.g. ``{clip: openai/clip-vit-base-patch32}``
            for a CLIP image tower saved without the projection and text tower it was fine-tuned with.
        allow_missing: this model lacks some of the other models' body tensors (a masked LM has no
            pooler); those are kept from each evaluated model instead of being an architecture error.
        check_provenance: refuse statistics files whose recorded model fingerprint is not this
            model's (set ``false`` only to pair a model with another checkpoint's statistics on purpose).
    """

    path: str
    fisher: str | None = None
    mask_fisher: str | None = None
    inputs: dict[str, str] = field(default_factory=dict)
    data: pl.LightningDataModule | None = None
    task: str | None = None
    name: str | None = None
    family: str | None = None
    backbone_args: dict[str, Any] = field(default_factory=dict)
    allow_missing: bool = False
    check_provenance: bool = True

    def input(self, key: str) -> str | None:
        return (self.inputs or {}).get(key) or (getattr(self, key) if key in LEGACY_INPUTS else None)


def under(root: str, path: str | None) -> str | None:
    return None if path is None else str(Path(root) / path)  # an absolute `path` stays as it is


def input_under(root: str, path: str | None) -> str | None:
    """An input under ``root`` if it is there; otherwise as given (a hub id such as
    ``textattack/bert-base-uncased-MNLI``, or a path relative to the working directory)."""
    rooted = under(root, path)
    return rooted if rooted is not None and Path(rooted).exists() else path


def rooted(spec: ModelSpec, root: str) -> ModelSpec:
    return replace(spec, path=input_under(root, spec.path), fisher=input_under(root, spec.fisher),
                   mask_fisher=input_under(root, spec.mask_fisher),
                   inputs={k: input_under(root, v) for k, v in (spec.inputs or {}).items()})


def with_shared_data(specs: list[ModelSpec], data, data_for: str, target: int) -> list[ModelSpec]:
    """``data`` given once for the models that have none of their own: the ``target`` only, or ``all``
    (each gets a copy, made before any set-up, so no two models share a tokenizer or a split). Models
    that share data share a label space: their ``task`` defaults to the data's name."""
    if data is None:
        return list(specs)
    chosen = [i for i, spec in enumerate(specs) if spec.data is None and (data_for == "all" or i == target)]
    if not chosen:
        raise ValueError(f"`data` is given but every model it would apply to ({data_for}) has data of its own")
    task = data_name(data) if len(chosen) > 1 else None
    return [replace(spec, data=data if i == chosen[0] else copy.deepcopy(data), task=spec.task or task)
            if i in chosen else spec for i, spec in enumerate(specs)]


def data_name(data) -> str | None:
    """The data's task (GLUE) or source and shift (images)."""
    task = getattr(data, "task", None)
    hp = getattr(data, "hparams", {})
    return getattr(task, "name", None) or "_".join(str(x) for x in (hp.get("source"), hp.get("train_shift")) if x) \
        or None


def display_names(specs: list[ModelSpec]) -> list[str]:
    """Result-column names: the spec's name, else its data's name, else the folder name; made unique
    by index."""
    names = [spec.name or (data_name(spec.data) if spec.data is not None else None) or Path(spec.path).name
             for spec in specs]
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


class ModelPool:
    """The specs' models loaded (frozen, eval mode), with their names, tasks and merged tensors."""

    def __init__(self, specs: list[ModelSpec], target: int, base: str | None = None) -> None:
        self.specs, self.target, self.base_path = specs, target, base
        self.backbones: list[Backbone] = [load_backbone(s.path, s.family, **(s.backbone_args or {})) for s in specs]
        for backbone in self.backbones:
            backbone.requires_grad_(False).eval()
        self.names = display_names(specs)
        self.tasks = [s.task or name for s, name in zip(specs, self.names)]
        self.evaluated = [i for i, s in enumerate(specs) if s.data is not None]
        for i in self.evaluated:  # before the states are read: a CLIP zero-shot head is built from the data here
            connect_data(self.backbones[i], specs[i].data)
        self.shared_task = len(set(self.tasks)) == 1
        head_names = set() if self.shared_task else {n for b in self.backbones for n in b.head_parameter_names()}
        self.states = [{n: p.detach() for n, p in b.model.named_parameters()} for b in self.backbones]
        self.merged_names = self._merged_names(head_names)

    def base_state(self) -> dict[str, torch.Tensor] | None:
        """The pre-trained model's parameters (task-vector methods' ``base``), loaded like a model."""
        if self.base_path is None:
            return None
        target = self.specs[self.target]
        base = load_backbone(self.base_path, target.family, **(target.backbone_args or {}))
        return {n: p.detach() for n, p in base.model.named_parameters()}

    def inputs(self, key: str) -> list[str | None]:
        return [s.input(key) for s in self.specs]

    def _merged_names(self, head_names: set[str]) -> list[str]:
        partial = [i for i, spec in enumerate(self.specs) if spec.allow_missing]
        if not partial:
            return shared_body_names(self.states, head_names)
        complete = [s for i, s in enumerate(self.states) if i not in partial]
        names = shared_body_names(complete, head_names) if len(complete) > 1 else \
            sorted(set(complete[0]) - set(head_names))
        kept = sorted(n for n in names if any(n not in self.states[i] for i in partial))
        names = [n for n in names if n not in kept]
        if not names:
            raise ValueError("the models share no body tensor: nothing to merge")
        for i in partial:
            wrong = [n for n in names if self.states[i][n].shape != self.states[self.target][n].shape]
            if wrong:
                raise ValueError(f"Model {i} ({self.specs[i].path}) differs in shape: {wrong[:5]}")
        if kept:
            rank_zero_info(f"Not in every model, kept as they are: {kept[:8]}{' ...' if len(kept) > 8 else ''}")
        return names
