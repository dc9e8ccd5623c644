"""Merging models straight from safetensors files, a slice of a tensor at a time, into a new file.

Peak memory is a few slices (``chunk_elements`` each), not whole models, so models larger than RAM
can be merged. Files are read with ``pread`` rather than ``safetensors.safe_open``: the latter
memory-maps the file, and every mapped page it touches is counted in the process's resident memory
until the file is closed. The output is written to a temporary name (a temporary folder for export
directories) and renamed once complete, so a failed merge leaves what was on disk untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from lightning_merge.atomic import create_hidden_file, staged_directory
from lightning_merge.fisher.io import read_fisher_metadata
from lightning_merge.fisher.masks import expand_mask_fisher
from lightning_merge.fisher.provenance import check_provenance, fingerprint_reader
from lightning_merge.merging.formulas import normalize_coefficients
from lightning_merge.merging.methods import MergeMethod
from lightning_merge.merging.state_dicts import check_fisher

WEIGHTS_NAME, INDEX_NAME = "model.safetensors", "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_CODES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Header facts and element-range reads of one ``.safetensors`` file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as err:
            raise FileNotFoundError(f"cannot open {self.path}: {err}") from err
        size = os.fstat(self._fd).st_size
        try:
            (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(os.pread(self._fd, header_len, 8))
        except (struct.error, ValueError) as err:
            os.close(self._fd)
            raise ValueError(f"{self.path} is not a readable safetensors file (corrupt or truncated): {err}") from err
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self.entries = header
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            if self._data_start + end > size or entry["dtype"] not in _DTYPES:
                os.close(self._fd)
                raise ValueError(f"{self.path} is corrupt or truncated: tensor {name!r} lies beyond the file "
                                 f"or has an unknown dtype")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return _DTYPES[self.entries[name]["dtype"]]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements ``[start, stop)`` of tensor ``name``, flattened."""
        entry, dtype = self.entries[name], self.dtype(name)
        size = dtype.itemsize
        begin, end = entry["data_offsets"]
        stop = (end - begin) // size if stop is None else stop
        values = torch.empty(stop - start, dtype=dtype)
        if values.numel():  # read straight into the tensor's memory: no intermediate bytes object
            got = os.preadv(self._fd, [values.view(torch.uint8).numpy()], self._data_start + begin + start * size)
            if got != values.numel() * size:
                raise ValueError(f"{self.path} is truncated inside tensor {name!r}")
        return values

    def read_tensor(self, name: str) -> torch.Tensor:
        return self.read(name).view(self.shape(name))

    def close(self) -> None:
        os.close(self._fd)


class Checkpoint:
    """Tensors by name from one safetensors file, a folder holding ``model.safetensors``, or a sharded
    folder (``model.safetensors.index.json``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir() and (path / INDEX_NAME).is_file():
            weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            files = {f: SafetensorsFile(path / f) for f in sorted(set(weight_map.values()))}
            self.where = {name: files[f] for name, f in weight_map.items()}
            self.files = list(files.values())
        else:
            file = SafetensorsFile(path / WEIGHTS_NAME if path.is_dir() else path)
            self.where, self.files = dict.fromkeys(file.keys(), file), [file]
        self.path = path

    def keys(self) -> list[str]:
        return list(self.where)

    def __getattr__(self, attr):  # shape / dtype / read / read_tensor of the file holding the tensor
        if attr in ("shape", "dtype", "read", "read_tensor"):
            return lambda name, *args: getattr(self.where[name], attr)(name, *args)
        raise AttributeError(attr)

    def close(self) -> None:
        for f in self.files:
            f.close()


class SafetensorsWriter:
    """Writes a safetensors file whose tensors arrive in slices, to a temporary name until ``commit``."""

    def __init__(self, path: str | os.PathLike, entries: dict[str, tuple[torch.dtype, torch.Size]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        header, offset = {}, 0
        if metadata:
            header["__metadata__"] = metadata
        for name, (dtype, shape) in entries.items():
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # data aligned to 8 bytes, as safetensors writes it
        self.header, self._data_start = header, 8 + len(encoded)
        self._fd, self.tmp = create_hidden_file(self.path)
        os.pwrite(self._fd, struct.pack("<Q", len(encoded)) + encoded, 0)
        os.ftruncate(self._fd, self._data_start + offset)

    def write(self, name: str, values: torch.Tensor, start: int = 0) -> None:
        """Write flat ``values`` as elements ``start…`` of tensor ``name``."""
        entry = self.header[name]
        values = values.detach().reshape(-1).to("cpu", _DTYPES[entry["dtype"]]).contiguous()
        position = self._data_start + entry["data_offsets"][0] + start * values.element_size()
        os.pwrite(self._fd, values.view(torch.uint8).numpy(), position)

    def commit(self) -> Path:
        os.fsync(self._fd)
        os.close(self._fd)
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        os.close(self._fd)
        Path(self.tmp).unlink(missing_ok=True)


def merge_safetensors(models: Sequence[str | os.PathLike], coefficients: Sequence[float], output: str | os.PathLike,
                      method: MergeMethod, fishers: Sequence[str | os.PathLike] | None = None,
                      keep: Sequence[str] = (), target: int = 0, chunk_elements: int = 1 << 20,
                      check_provenance: bool = True) -> Path:
    """Merge ``models`` (files or export folders) with ``method`` into ``output``, streaming.

    Tensors whose name starts with a prefix in ``keep`` (the task head, e.g. ``classifier.``) are
    copied from the ``target`` model, never averaged; every other tensor must exist with one shape in
    every model (and in every Fisher). Each Fisher file's recorded model fingerprint must be its model's
    unless ``check_provenance`` is off. For folders the output is a folder with the target's other
    files (config, tokenizer, manifest) and one ``model.safetensors``; sharded inputs are read shard
    by shard and written as one file. Returns the output path.
    """
    if len(models) < 2:
        raise ValueError(f"merging needs at least 2 models, got {len(models)}")
    if method.fisher_field is not None and (fishers is None or len(fishers) != len(models)):
        raise ValueError(f"{method.name} needs one Fisher file per model ({len(models)}), got "
                         f"{0 if fishers is None else len(fishers)}")
    if not 0 <= target < len(models):
        raise ValueError(f"target index {target} out of range for {len(models)} models")
    lam = normalize_coefficients(coefficients, len(models))
    inputs: list[Checkpoint] = []
    weight_source: list[_FisherSource] = []
    try:
        for m in models:  # appended one by one, so the finally closes whatever was opened
            inputs.append(Checkpoint(m))
        names = inputs[target].keys()
        merged = [n for n in names if not n.startswith(tuple(keep))]
        _check_same_architecture(inputs, merged, target)
        shapes = {n: inputs[target].shape(n) for n in merged}
        if method.fisher_field is not None:
            if check_provenance:
                _check_fisher_provenance(inputs, fishers)
            for i, f in enumerate(fishers):
                weight_source.append(_FisherSource(f, shapes, f"model {i}", getattr(method, "mask_rule", "paper")))
        sources = weight_source or None
        scales = _streamed_scales(method, sources, merged, chunk_elements)
        entries = {n: (inputs[target].dtype(n), inputs[target].shape(n)) for n in names}
        metadata = {**inputs[target].files[0].metadata, "merge_method": method.name,
                    "merge_coefficients": json.dumps(lam.tolist()),
                    "merge_sources": json.dumps([str(m) for m in models])}
        return _write_output(Path(models[target]), Path(output), entries, metadata, lambda writer: _merge_into(
            writer, inputs, sources, method, lam, scales, names, set(merged), target, chunk_elements))
    finally:
        for opened in (*inputs, *weight_source):
            opened.close()


def _check_fisher_provenance(inputs: list[Checkpoint], fishers: Sequence[str | os.PathLike]) -> None:
    for i, (checkpoint, path) in enumerate(zip(inputs, fishers)):
        shapes = {n: checkpoint.shape(n) for n in checkpoint.keys()}
        note = check_provenance(read_fisher_metadata(path),
                                lambda names, c=checkpoint, s=shapes: fingerprint_reader(s, c.read, names),
                                f"Fisher file {path}", f"model {i} ({checkpoint.path})")
        if note:
            warnings.warn(note, stacklevel=3)


def _check_same_architecture(inputs: list[Checkpoint], names: list[str], target: int) -> None:
    for i, checkpoint in enumerate(inputs):
        missing = [n for n in names if n not in checkpoint.where]
        if missing:
            raise ValueError(f"Model {i} ({checkpoint.path}) has a different architecture: it lacks {missing[:5]} "
                             f"(task heads belong in `keep`)")
        wrong = [(n, tuple(checkpoint.shape(n)), tuple(inputs[target].shape(n))) for n in names
                 if checkpoint.shape(n) != inputs[target].shape(n)]
        if wrong:
            raise ValueError(f"Model {i} ({checkpoint.path}) differs in shape from the target: {wrong[:3]}")


class _FisherSource:
    """Per-tensor merge weights from a full Fisher file (read in slices) or a mask Fisher (expanded)."""

    def __init__(self, path, shapes, label, mask_rule) -> None:
        self.path, self.label, self.shapes = path, label, shapes
        metadata = read_fisher_metadata(path)
        self.file = SafetensorsFile(path)
        self.mask = metadata.get("kind") == "mask"
        if self.mask:
            layout = metadata["mask_layout"]
            masks = {n: self.file.read_tensor(n) for n in layout}
            self._expand = lambda name: expand_mask_fisher(masks, layout, {name: shapes[name]}, mask_rule)[name]
            self._expanded: tuple[str | None, torch.Tensor | None] = (None, None)  # the tensor being merged
            return
        missing = [n for n in shapes if n not in self.file.entries]
        if missing:
            raise KeyError(f"{label} ({path}) has no Fisher for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        wrong = [n for n in shapes if self.file.shape(n) != shapes[n]]
        if wrong:
            raise ValueError(f"{label} ({path}): Fisher of {wrong[0]!r} has shape {tuple(self.file.shape(wrong[0]))}, "
                             f"the parameter {tuple(shapes[wrong[0]])}")

    def read(self, name: str, start: int, stop: int) -> torch.Tensor:
        if not self.mask:
            values = self.file.read(name, start, stop)
            check_fisher({name: values}, [name], {name: values.shape}, f"{self.label} ({self.path})")
            return values
        if self._expanded[0] != name:  # expanded (and checked) once per tensor, not once per slice
            expanded = self._expand(name).reshape(-1)
            check_fisher({name: expanded}, [name], {name: expanded.shape}, f"{self.label} ({self.path})")
            self._expanded = (name, expanded)
        return self._expanded[1][start:stop]

    def close(self) -> None:
        self.file.close()


def _slices(numel: int, chunk: int):
    return [(s, min(s + chunk, numel)) for s in range(0, max(numel, 1), chunk)] if numel else []


def _streamed_scales(method, sources, names, chunk) -> list[float] | None:
    if sources is None or not getattr(method, "normalize", False):
        return None
    scales = []
    for source in sources:
        total = sum(float(source.read(n, a, b).double().pow(2).sum()) for n in names
                    for a, b in _slices(source.shapes[n].numel(), chunk))
        if total <= 0:
            raise ValueError(f"{source.label}: the Fisher is zero everywhere: it cannot be normalized")
        scales.append(total ** -0.5)
    return scales


def _merge_into(writer, inputs, sources, method, lam, scales, names, merged, target, chunk) -> None:
    for name in names:
        numel = inputs[target].shape(name).numel()
        for start, stop in _slices(numel, chunk):
            if name not in merged:
                writer.write(name, inputs[target].read(name, start, stop), start)
                continue
            thetas = [c.read(name, start, stop) for c in inputs]
            weights = None if sources is None else [s.read(name, start, stop) for s in sources]
            writer.write(name, method.merge_tensor(thetas, weights, lam, target, scales), start)


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
