"""Gram files: one symmetric ``d × d`` tensor per distinct layer input (sums ``Σ x xᵀ`` over real
tokens, float32 or float64), keyed by the first layer that reads it; the header says which weight
uses which Gram (``gram_keys``), how many rows each summed (``gram_rows``), and where it came from
(the same provenance fields as a Fisher file). Readable with plain ``safetensors``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from lightning_merge.fisher.io import decoded_header, open_statistics
from lightning_merge.tensor_files import SHARD_BYTES, Checkpoint, save_tensors

KIND = "gram"
SYMMETRY_TOLERANCE = 1e-5  # |G − Gᵀ| relative to the largest diagonal entry


def save_gram(path: str | os.PathLike, sums: Mapping[str, torch.Tensor], rows: Mapping[str, int],
              keys: Mapping[str, str], metadata: Mapping[str, object], shard_bytes: int = SHARD_BYTES,
              transposed: Sequence[str] = ()) -> Path:
    """Write Gram sums (symmetrized: ``(G + Gᵀ)/2`` removes the GEMM's rounding asymmetry), with
    ``gram_keys`` (weight name -> Gram key), ``gram_rows`` (Gram key -> rows summed) and
    ``transposed_weights`` (weights stored ``in × out``, GPT-2's ``Conv1D``) in the header; a ``path``
    ending in ``.safetensors.index.json`` is written in shards of at most ``shard_bytes``."""
    grams = {}
    for key, value in sums.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"Gram {key!r} has NaN or Inf entries; not writing {path}")
        grams[key] = ((value + value.T) / 2).contiguous()
    absent = sorted(set(keys.values()) - set(grams))
    if absent:
        raise ValueError(f"gram_keys names Grams that are not given: {absent[:5]}")
    return save_tensors(path, grams, {**metadata, "kind": KIND, "gram_keys": dict(keys),
                                      "gram_rows": {k: int(rows[k]) for k in grams},
                                      "transposed_weights": sorted(transposed)}, shard_bytes)


TILE = 256  # rows and columns of the blocks a Gram's symmetry is checked in


def check_gram(gram: torch.Tensor, weight: str, weight_shape: torch.Size, label: str,
               transposed: bool = False) -> None:
    """A Gram fit for ``weight`` (``out × in``, or ``in × out`` when ``transposed``): ``in × in``, floating,
    finite, symmetric, diagonal ≥ 0."""
    d = weight_shape[0 if transposed else -1]
    if len(weight_shape) != 2 or tuple(gram.shape) != (d, d):
        raise ValueError(f"{label}: the Gram for {weight!r} is {tuple(gram.shape)} but the layer's weight is "
                         f"{tuple(weight_shape)} (it needs {d} × {d}): a Gram of another model or layer size")
    if not gram.dtype.is_floating_point:
        raise ValueError(f"{label}: the Gram for {weight!r} has dtype {gram.dtype}; Grams are floats")
    if not torch.isfinite(gram.sum()):  # NaN or Inf make the sum non-finite; so may overflow: look closer
        if not all(torch.isfinite(gram[i:i + 256]).all() for i in range(0, d, 256)):
            raise ValueError(f"{label}: the Gram for {weight!r} has NaN or Inf entries")
    diagonal = gram.diagonal()
    if (diagonal < 0).any():
        raise ValueError(f"{label}: the Gram for {weight!r} has negative diagonal entries (a sum of squares)")
    tolerance = SYMMETRY_TOLERANCE * max(float(diagonal.max()) if d else 0.0, 1e-30)
    for row in range(0, d, TILE):  # tile against mirrored tile: no d × d temporaries, each tile in cache
        for column in range(row, d, TILE):
            tile, mirrored = gram[row:row + TILE, column:column + TILE], gram[column:column + TILE, row:row + TILE]
            if float((tile - mirrored.T).abs().max()) > tolerance:
                raise ValueError(f"{label}: the Gram for {weight!r} is not symmetric")


class GramInput:
    """One model's Grams for a merge (a Gram file, or ``{weight name: Gram}`` in memory): ``read(name,
    …)`` gives the whole Gram of the layer whose weight is ``name`` (every piece of that weight needs
    all of it), or an empty tensor for a parameter without one. Every Gram is checked on opening.
    ``transposed``: the weights stored ``in × out`` (read from a file's header; given for in-memory Grams)."""

    EMPTY = torch.empty(0)

    def __init__(self, source: str | os.PathLike | Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size],
                 label: str, in_memory: bool = False, transposed: Iterable[str] = ()) -> None:
        self.label = label
        transposed = set(transposed)
        self.path = None if isinstance(source, Mapping) else Path(source)
        self.file: Checkpoint | None = None
        self._cache: tuple[str | None, torch.Tensor | None] = (None, None)
        if self.path is None:
            self.metadata: dict = {}
            self._loaded = dict(source)
            self.keys = {name: name for name in source}
        else:
            self.file = open_statistics(self.path)
            self.metadata = decoded_header(self.file)
            self._loaded = None
            if self.metadata.get("kind") != KIND or not isinstance(self.metadata.get("gram_keys"), dict):
                self.close()
                raise ValueError(f"{label}: {self.path} is not a Gram file (its header has no kind: gram and "
                                 f"gram_keys): estimate one with GramEstimationModule")
            self.keys = dict(self.metadata["gram_keys"])
            transposed |= set(self.metadata.get("transposed_weights", ()))
            absent = sorted(set(self.keys.values()) - set(self.file.keys()))
            if absent:
                self.close()
                raise ValueError(f"{label}: {self.path} lacks the Grams its header names: {absent[:5]}")
        self.keys = {w: k for w, k in self.keys.items() if w in shapes}  # e.g. heads left out of this merge
        self.transposed = transposed & set(self.keys)
        keep = in_memory or self._loaded is not None
        users: dict[str, list[str]] = {}
        for weight, key in sorted(self.keys.items()):
            users.setdefault(key, []).append(weight)
        loaded = {}
        for key, weights in users.items():  # one Gram in memory at a time unless kept
            gram = self._gram(key)
            for weight in weights:
                check_gram(gram, weight, shapes[weight], label, weight in self.transposed)
            if keep:
                loaded[key] = gram
        if keep:
            self._loaded = loaded
            self.close()

    @property
    def weights(self) -> set[str]:
        return set(self.keys)

    def _gram(self, key: str) -> torch.Tensor:
        if self._loaded is not None:
            return self._loaded[key]
        return self.file.read_tensor(key)

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        key = self.keys.get(name)
        if key is None:
            return self.EMPTY
        if self._cache[0] != key:  # the pieces of a weight (and q/k/v sharing one Gram) come in a row
            self._cache = (key, self._gram(key))
        return self._cache[1]

    def to(self, device) -> GramInput:
        if self._loaded is None:
            raise RuntimeError(f"{self.label}: only Grams read whole (in_memory) can move to a device")
        self._loaded = {k: v.to(device) for k, v in self._loaded.items()}
        self._cache = (None, None)
        return self

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

