"""Merging models straight from safetensors files into a new file, a slice of a tensor at a time.

Peak memory is a few slices, not whole models, so models larger than RAM can be merged. The pieces are
the merge driver's, the same as in memory, so the result is the same bit for bit. The output is written
to a temporary name (a temporary folder for export directories) and renamed once complete, so a failed
merge leaves what was on disk untouched. ``lightning-merge merge --config FILE.yaml`` runs
:func:`merge_checkpoints` from a YAML file (no evaluation).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lightning_merge.atomic import staged_directory
from lightning_merge.merging.base import BASE, CONVEX, MergeMethod
from lightning_merge.merging.driver import CHUNK, MergePlan, slices
from lightning_merge.merging.formulas import check_coefficients
from lightning_merge.merging.tensors import CheckpointTensors
from lightning_merge.tensor_files import (
    INDEX_NAME,
    WEIGHTS_NAME,
    Checkpoint,
    SafetensorsFile,
    SafetensorsWriter,
)

__all__ = ["Checkpoint", "SafetensorsFile", "SafetensorsWriter", "merge_checkpoints", "merge_safetensors"]


def merge_safetensors(models: Sequence[str | os.PathLike], coefficients: Sequence[float], output: str | os.PathLike,
                      method: MergeMethod, fishers: Sequence[str | os.PathLike] | None = None,
                      keep: Sequence[str] = (), target: int = 0, chunk_elements: int = CHUNK,
                      check_provenance: bool = True, inputs: Mapping[str, Sequence] | None = None,
                      base: str | os.PathLike | None = None) -> Path:
    """Merge ``models`` (files or export folders) with ``method`` into ``output``, streaming.

    ``inputs`` are the method's per-model inputs (name -> one statistics file per model; ``fishers``
    is the same for a method with one input, e.g. ``FisherMerge``), ``base`` its shared pre-trained
    model (task-vector methods). Tensors whose name starts with a prefix in ``keep`` (the task head, e.g.
    ``classifier.``) are copied from the ``target`` model, never merged; every other tensor must exist
    with one shape in every model, the base and every statistics file, whose recorded model fingerprint
    must be its model's unless ``check_provenance`` is off. Everything is checked before anything is
    written. For folders the output is a folder with the target's other files (config, tokenizer,
    manifest) and one ``model.safetensors``; sharded inputs are read shard by shard. Returns the path.
    """
    inputs = dict(inputs or {})
    if fishers is not None:
        if len(method.model_inputs) != 1:
            raise ValueError(f"{method.name} reads {list(method.model_inputs) or 'no'} per-model inputs: give them "
                             f"as inputs={{name: files}}, not fishers")
        inputs.setdefault(method.model_inputs[0], list(fishers))
    lam = check_coefficients(coefficients, len(models), normalize=method.coefficients == CONVEX)
    readers: list[CheckpointTensors] = []
    plan = None
    try:
        for i, m in enumerate(models):  # appended one by one, so the finally closes whatever was opened
            readers.append(CheckpointTensors(m, f"model {i} ({m})"))
        if base is not None:
            readers.append(CheckpointTensors(base, f"base ({base})"))
        models_, shared = readers[:len(models)], ({BASE: readers[-1]} if base is not None else {})
        names = models_[target].names() if 0 <= target < len(models) else []
        merged = [n for n in names if not n.startswith(tuple(keep))]
        plan = MergePlan(method, models_, merged, inputs=inputs, shared=shared, target=target,
                         check_provenance=check_provenance, chunk=chunk_elements)
        source = models_[target].checkpoint
        entries = {n: (source.dtype(n), source.shape(n)) for n in names}
        metadata = {**source.files[0].metadata, "merge_method": method.name, "merge_coefficients": json.dumps(lam),
                    "merge_sources": json.dumps([str(m) for m in models])}

        def fill(writer: SafetensorsWriter) -> None:
            for name in names:
                if name not in plan.shapes:  # kept as the target has it
                    for start, stop in slices(source.shape(name).numel(), chunk_elements):
                        writer.write(name, source.read(name, start, stop), start)
            buffer = torch.empty(chunk_elements, dtype=torch.float32)
            plan.run(lam, lambda name, a, b: buffer[:b - a], lambda name, a, values: writer.write(name, values, a))

        return _write_output(Path(models[target]), Path(output), entries, metadata, fill)
    finally:
        if plan is not None:
            plan.close()
        for opened in readers:
            opened.close()


def merge_checkpoints(models: list[str], method: MergeMethod, output: str, coefficients: list[float] | None = None,
                      inputs: dict[str, list[str]] | None = None, base: str | None = None,
                      keep: list[str] | None = None, target: int = 0, check_provenance: bool = True) -> Path:
    """Merge checkpoints file to file, without evaluating (``lightning-merge merge --config FILE``).

    Args:
        models: export folders, ``.safetensors`` files or sharded folders, one per model.
        method: the merge method, by ``class_path`` (e.g. ``lightning_merge.merging.FisherMerge``).
        output: a folder (when the models are folders) or a ``.safetensors`` file.
        coefficients: ``λ``, one per model (default: equal, ``1/M``); convex methods normalize them,
            task-vector methods use them as scales.
        inputs: the method's per-model inputs, e.g. ``{fisher: [a.safetensors, b.safetensors]}``.
        base: the pre-trained model, for task-vector methods.
        keep: name prefixes copied from the target instead of merged (task heads, e.g. ``classifier.``).
        target: the model whose kept tensors and other files the output carries.
        check_provenance: refuse statistics files recorded for another model.
    """
    lam = coefficients if coefficients is not None else [1.0 / len(models)] * len(models)
    out = merge_safetensors(models, lam, output, method, keep=keep or (), target=target, inputs=inputs, base=base,
                            check_provenance=check_provenance)
    print(f"Wrote the {method.name} merge of {len(models)} models (coefficients {lam}) to {out}")
    return out


def _write_file(path: Path, entries, metadata, fill) -> Path:
    writer = SafetensorsWriter(path, entries, metadata)
    try:
        fill(writer)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def _write_output(target_path: Path, output: Path, entries, metadata, fill) -> Path:
    if not target_path.is_dir():
        return _write_file(output, entries, metadata, fill)
    with staged_directory(output) as staging:
        for item in target_path.iterdir():
            if item.is_file() and not item.name.endswith(".safetensors") and item.name != INDEX_NAME:
                shutil.copy2(item, staging / item.name)
        _write_file(staging / WEIGHTS_NAME, entries, metadata, fill)
    return output
