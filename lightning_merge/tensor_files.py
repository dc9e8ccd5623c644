"""safetensors files (models, statistics) read a slice at a time (``pread``) and written a slice at a time, atomically.

Files are read with ``pread`` rather than ``safetensors.safe_open``: the latter memory-maps the file,
and every mapped page it touches is counted in the process's resident memory until the file is
closed. A written file goes to a hidden temporary name and is renamed once complete.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from lightning_merge.atomic import create_hidden_file

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

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    """Write ``tensors`` (each in its own dtype) with ``metadata`` in the header, atomically. Header and
    tensors are sorted and written by :class:`SafetensorsWriter` (safetensors' ``save_file`` orders the
    metadata differently in every process): the same inputs give the same bytes. Non-string metadata
    values are stored as JSON."""
    header = {k: metadata[k] if isinstance(metadata[k], str) else json.dumps(metadata[k], sort_keys=True)
              for k in sorted(metadata)}
    names = sorted(tensors)
    writer = SafetensorsWriter(path, {n: (tensors[n].dtype, tensors[n].shape) for n in names}, header)
    try:
        for name in names:
            writer.write(name, tensors[name])
    except BaseException:
        writer.abort()
        raise
    return writer.commit()
