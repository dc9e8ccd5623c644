"""safetensors files (models, statistics) read a slice at a time (``pread``) and written a slice at a time, atomically.

Files are read with ``pread`` rather than ``safetensors.safe_open``: the latter memory-maps the file,
and every mapped page it touches is counted in the process's resident memory until the file is
closed. A written file goes to a hidden temporary name and is renamed once complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch

from lightning_merge.atomic import create_hidden_file, staged_file

WEIGHTS_NAME, INDEX_NAME, INDEX_SUFFIX = "model.safetensors", "model.safetensors.index.json", ".index.json"
SHARD_BYTES = 4 << 30  # default largest shard of a sharded statistics file
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


def is_index(path: str | os.PathLike) -> bool:
    """A sharded file's index (``*.index.json``: ``weight_map`` tensor -> shard, ``metadata``)."""
    return str(path).endswith(INDEX_SUFFIX)


class Checkpoint:
    """Tensors by name from one safetensors file, a folder holding ``model.safetensors``, a sharded
    folder (``model.safetensors.index.json``), or a sharded file named by its index
    (``NAME.safetensors.index.json``: statistics files too large for one file). ``metadata`` is the
    file's header, or the index's ``metadata``."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        index = path / INDEX_NAME if path.is_dir() else path if is_index(path) else None
        if index is not None and (index.is_file() or is_index(path)):
            try:
                data = json.loads(index.read_text())
                weight_map = data["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{index} is not a readable shard index (corrupt, truncated or missing): "
                                 f"{err}") from err
            self.metadata = {k: v if isinstance(v, str) else json.dumps(v)
                             for k, v in (data.get("metadata") or {}).items()}
            files: dict[str, SafetensorsFile] = {}
            try:
                for f in sorted(set(weight_map.values())):
                    files[f] = SafetensorsFile(index.parent / f)
            except BaseException:
                for opened in files.values():
                    opened.close()
                raise
            self.where = {name: files[f] for name, f in weight_map.items()}
            self.files = list(files.values())
        else:
            file = SafetensorsFile(path / WEIGHTS_NAME if path.is_dir() else path)
            self.where, self.files, self.metadata = dict.fromkeys(file.keys(), file), [file], file.metadata
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

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, object],
                 shard_bytes: int = SHARD_BYTES) -> Path:
    """Write ``tensors`` (each in its own dtype) with ``metadata`` in the header, atomically. A ``path``
    ending in ``.index.json`` is written sharded: shards of at most ``shard_bytes`` (a larger tensor
    alone) named ``NAME-<content hash>-00001-of-0000N.safetensors`` beside it, each with the header, then
    the index (``metadata`` and ``weight_map``, as Hugging Face's) last: the index is the file's completion
    mark. Shards of new content get new names, so a failed rewrite leaves the previous index and all its
    shards intact; once the new index is in place, shards only the old one named are removed.

    Header and tensors are sorted and written by :class:`SafetensorsWriter` (safetensors' ``save_file``
    orders the metadata differently in every process): the same inputs give the same bytes. Non-string
    metadata values are stored as JSON."""
    path = Path(path)
    header = {k: metadata[k] if isinstance(metadata[k], str) else json.dumps(metadata[k], sort_keys=True)
              for k in sorted(metadata)}
    names = sorted(tensors)
    if not is_index(path):
        return _write_file(path, {n: tensors[n] for n in names}, header)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    stem = path.name[:-len(INDEX_SUFFIX)].removesuffix(".safetensors")
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for name in names:
        digest.update(name.encode())
        digest.update(tensors[name].detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())  # no copy
    token = digest.hexdigest()[:10]  # new content, new names: the old index's shards stay intact until replaced
    previous = _shards_of(path)
    weight_map = {}
    for i, group in enumerate(shards):
        shard = f"{stem}-{token}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_file(path.parent / shard, {n: tensors[n] for n in group}, header)
        weight_map.update(dict.fromkeys(group, shard))
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps({"metadata": header, "weight_map": weight_map}, indent=1, sort_keys=True) + "\n")
    for stale in previous - set(weight_map.values()):
        (path.parent / stale).unlink(missing_ok=True)
    return path


def _shards_of(index: Path) -> set[str]:
    try:
        return set(json.loads(index.read_text())["weight_map"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _write_file(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    writer = SafetensorsWriter(path, {n: (t.dtype, t.shape) for n, t in tensors.items()}, header)
    try:
        for name, values in tensors.items():
            writer.write(name, values)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()
