"""The merge-method contract: a method is one class that declares what it reads and merges one piece.

A method declares
* ``model_inputs``: per-model inputs besides the models' own weights, by name (``fisher``,
  ``mask_fisher``, ``gram``, ...): statistics files given per model (``ModelSpec.inputs`` or the
  ``fisher`` / ``mask_fisher`` keys), read tensor by tensor, checked finite, ≥ 0 and floating;
* ``shared_inputs``: inputs shared by all models, by name (``base``: the pre-trained model that task
  vectors are taken from), read like a model;
* ``coefficients``: ``convex`` (``λ_i ≥ 0`` normalized to sum 1: weights of an average) or ``scale``
  (``λ_i ≥ 0`` used as given: scales of task vectors);
* its hyper-parameters as typed ``__init__`` arguments (jsonargparse checks them when parsing YAML);
* optionally :meth:`piece_unit`: how many elements of a tensor a piece must hold a multiple of
  (RegMean: whole rows of a matrix, or the whole matrix when it is stored ``in × out``);
  ``open_input`` (its own reader of a per-model input) and ``check_inputs(name, readers)`` (a check
  across all models' readers of one input, run when they are opened).

and implements :meth:`merge` on a :class:`Piece` — the same slice of one tensor in every model and
input — and optionally :meth:`prepare`, a pass over all pieces before any merge (global statistics
such as a norm or a top-k threshold). The driver (:mod:`lightning_merge.merging.driver`) validates
every input once, then calls these on the same pieces whether the models are in memory or streamed
from files, so both give the same bits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

CONVEX, SCALE = "convex", "scale"
BASE = "base"


@dataclass
class Piece:
    """Elements ``[start, stop)`` of the flattened tensor ``name`` in every model and input."""

    name: str
    start: int
    stop: int
    thetas: list[torch.Tensor]  # one flat slice per model
    inputs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # model input -> one slice per model
    shared: dict[str, torch.Tensor] = field(default_factory=dict)  # shared input -> its slice


class MergeMethod:
    """Combines the models' tensors with coefficients ``λ``; ``name`` labels its rows in result tables."""

    model_inputs: tuple[str, ...] = ()
    shared_inputs: tuple[str, ...] = ()
    coefficients: ClassVar[Literal["convex", "scale"]] = CONVEX

    def __init__(self, name: str) -> None:
        self.name = name

    def piece_unit(self, name: str, shape: torch.Size) -> int:
        """Pieces of tensor ``name`` hold a multiple of this many elements (default 1: any cut)."""
        return 1

    def prepare(self, pieces: Callable[[], Iterator[Piece]], num_models: int) -> None:
        """A pass (or several: call ``pieces()`` again) over every piece before merging; default: none."""

    def merge(self, piece: Piece, coefficients: list[float], target: int, out: torch.Tensor) -> None:
        """Write the merged values of ``piece`` into ``out`` (a flat float tensor of its length)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
