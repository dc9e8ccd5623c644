"""The one path every merge takes: validate all inputs once, then feed a method the same pieces
(slices of one tensor across models and inputs, at most ``chunk`` elements) whether the tensors are in
memory or in files. Same pieces, same code: a streamed merge equals an in-memory one bit for bit."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch

from lightning_merge.fisher.provenance import check_provenance, fingerprint_reader
from lightning_merge.merging.base import CONVEX, MergeMethod, Piece
from lightning_merge.merging.formulas import check_coefficients
from lightning_merge.merging.tensors import Statistics, TensorReader

CHUNK = 1 << 19  # elements per piece: the few fp32 temporaries of a merge stay in cache


def slices(numel: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, numel)) for s in range(0, numel, chunk)]


def open_input(method: MergeMethod, name: str, source, shapes: Mapping[str, torch.Size], label: str,
               in_memory: bool) -> Statistics:
    """A method's per-model input; a method with its own way of reading one defines ``open_input``."""
    opener = getattr(method, "open_input", None)
    if opener is not None:
        return opener(name, source, shapes, label, in_memory)
    return Statistics(source, shapes, label, in_memory=in_memory)


class MergePlan:
    """``method`` bound to ``models`` (readers) and the inputs it declares, validated before any arithmetic.

    Args:
        names: the tensors to merge (default: all of the target's); the others (task heads) are not
            merged. Every model and shared input must hold each of them with the target's shape.
        inputs: per-model input name -> one source per model (a statistics file, or tensors in memory).
        shared: shared input name -> a reader (e.g. ``base``, the pre-trained model).
        check_provenance: each statistics file's recorded model fingerprint must be its model's (one
            flag for all models, or one per model).
        in_memory: read statistics files whole, once (for many merges of the same inputs).
    """

    def __init__(self, method: MergeMethod, models: Sequence[TensorReader], names: Sequence[str] | None = None, *,
                 inputs: Mapping[str, Sequence] | None = None, shared: Mapping[str, TensorReader] | None = None,
                 target: int = 0, check_provenance: bool | Sequence[bool] = True, in_memory: bool = False,
                 chunk: int = CHUNK) -> None:
        inputs, shared = dict(inputs or {}), dict(shared or {})
        if len(models) < 2:
            raise ValueError(f"merging needs at least 2 models, got {len(models)}")
        if not 0 <= target < len(models):
            raise ValueError(f"target index {target} out of range for {len(models)} models")
        self.method, self.models, self.target, self.chunk = method, list(models), target, chunk
        self.names = list(models[target].names() if names is None else names)
        self.shapes = {n: models[target].shape(n) for n in self._have(models[target], self.names)}
        for reader in [*models, *shared.values()]:
            self._same_architecture(reader)
        missing = [s for s in method.shared_inputs if shared.get(s) is None]
        if missing:
            raise ValueError(f"{method.name} needs {missing} (for task vectors: `base`, the pre-trained model the "
                             f"models were fine-tuned from)")
        self.shared = {s: shared[s] for s in method.shared_inputs}
        checked = [check_provenance] * len(models) if isinstance(check_provenance, bool) else list(check_provenance)
        self.inputs: dict[str, list[Statistics]] = {}
        try:
            for key in method.model_inputs:
                sources = inputs.get(key)
                if sources is None or len(sources) != len(models) or any(s is None for s in sources):
                    given = [i for i, s in enumerate(sources or []) if s is not None]
                    raise ValueError(f"{method.name} needs `{key}` for every model ({len(models)}); given for "
                                     f"models {given}")
                self.inputs[key] = []
                for i, source in enumerate(sources):
                    label = f"model {i} {key}" + ("" if isinstance(source, Mapping) else f" ({source})")
                    opened = open_input(method, key, source, self.shapes, label, in_memory)
                    self.inputs[key].append(opened)
                    if checked[i] and opened.path is not None:
                        self._check_provenance(opened, i)
                joint_check = getattr(method, "check_inputs", None)
                if joint_check is not None:
                    joint_check(key, self.inputs[key])
        except BaseException:
            self.close()
            raise

    def _have(self, reader: TensorReader, names: Sequence[str]) -> list[str]:
        available = set(reader.names())
        absent = [n for n in names if n not in available]
        if absent:
            raise ValueError(f"{reader.label} has a different architecture: it lacks {absent[:5]}"
                             f"{' ...' if len(absent) > 5 else ''} (task heads are not merged: leave them out)")
        return list(names)

    def _same_architecture(self, reader: TensorReader) -> None:
        self._have(reader, self.names)
        wrong = [(n, tuple(reader.shape(n)), tuple(self.shapes[n])) for n in self.names
                 if tuple(reader.shape(n)) != tuple(self.shapes[n])]
        if wrong:
            raise ValueError(f"{reader.label} differs in shape from the target model: {wrong[:3]}")

    def _check_provenance(self, statistics: Statistics, i: int) -> None:
        model = self.models[i]
        shapes = {n: model.shape(n) for n in model.names()}
        note = check_provenance(statistics.metadata, lambda names: fingerprint_reader(shapes, model.read, names),
                                f"{statistics.label.split(' (')[0]} file {statistics.path}", model.label)
        if note:
            warnings.warn(note, stacklevel=4)

    def _chunk(self, name: str) -> int:
        unit = self.method.piece_unit(name, self.shapes[name])
        return self.chunk if unit <= 1 else max(unit, self.chunk // unit * unit)

    def pieces(self) -> Iterator[Piece]:
        for name in self.names:
            for start, stop in slices(self.shapes[name].numel(), self._chunk(name)):
                yield Piece(name, start, stop, [m.read(name, start, stop) for m in self.models],
                            {k: [s.read(name, start, stop) for s in v] for k, v in self.inputs.items()},
                            {k: r.read(name, start, stop) for k, r in self.shared.items()})

    def prepare(self) -> None:
        """The method's global pass over this plan's pieces. A method keeps what it prepared (a norm, a
        threshold) on itself, so a method shared by two plans is prepared again when the other plan ran last."""
        if getattr(self.method, "_prepared_by", None) is not self:
            self.method.prepare(self.pieces, len(self.models))
            self.method._prepared_by = self

    def run(self, coefficients: Sequence[float], destination: Callable[[str, int, int], torch.Tensor],
            written: Callable[[str, int, torch.Tensor], None] | None = None) -> None:
        """Merge with ``coefficients``: each piece's result goes into ``destination(name, start, stop)``
        (a flat float32 tensor), then ``written(name, start, values)`` is told (e.g. to write it out)."""
        lam = check_coefficients(coefficients, len(self.models), normalize=self.method.coefficients == CONVEX)
        self.prepare()
        for piece in self.pieces():
            out = destination(piece.name, piece.start, piece.stop)
            self.method.merge(piece, lam, self.target, out)
            if written is not None:
                written(piece.name, piece.start, out)

    def close(self) -> None:
        for readers in self.inputs.values():
            for reader in readers:
                reader.close()


def merged_state(plan: MergePlan, coefficients: Sequence[float]) -> dict[str, torch.Tensor]:
    """Run ``plan`` into new float32 tensors, one per merged name."""
    out = {n: torch.empty(s, dtype=torch.float32) for n, s in plan.shapes.items()}
    flat = {n: t.view(-1) for n, t in out.items()}
    plan.run(coefficients, lambda name, a, b: flat[name][a:b])
    return out
