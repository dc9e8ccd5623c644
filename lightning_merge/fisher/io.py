"""Fisher files: safetensors, one float32 tensor per parameter name, facts about the estimate in the
header. Written to a temporary name and renamed, so a failed run never leaves half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from lightning_merge.tensor_files import SHARD_BYTES, Checkpoint, save_tensors

REQUIRED_METADATA = ("num_examples", "variant")


def save_fisher(path: str | os.PathLike, fisher: dict[str, torch.Tensor], metadata: dict[str, object],
                shard_bytes: int = SHARD_BYTES) -> Path:
    """Write ``fisher`` (parameter name → mean squared gradient) with ``metadata`` in the header; a
    ``path`` ending in ``.safetensors.index.json`` is written in shards of at most ``shard_bytes``."""
    path = Path(path)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"Fisher metadata lacks {missing}")
    for name, value in fisher.items():
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ValueError(f"Fisher entry {name!r} has NaN, Inf or negative values; not writing {path}")
    return save_tensors(path, {n: v.float() for n, v in fisher.items()}, metadata, shard_bytes)


def read_fisher_metadata(path: str | os.PathLike) -> dict[str, object]:
    """The header facts (numbers decoded), without reading any tensor."""
    with open_statistics(path) as f:
        return decoded_header(f)


def decoded_header(file: Checkpoint) -> dict[str, object]:
    """An opened statistics file's header, its JSON-encoded values decoded."""
    out: dict[str, object] = {}
    for key, value in (file.metadata or {}).items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_fisher(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load all (or the named) Fisher tensors; missing names and non-finite values are errors."""
    with open_statistics(path) as f:
        available = set(f.keys())
        wanted = sorted(available) if names is None else names
        absent = [n for n in wanted if n not in available]
        if absent:
            raise KeyError(f"{path} has no Fisher for {absent[:8]}{' ...' if len(absent) > 8 else ''}")
        return {n: f.read_tensor(n) for n in wanted}


def open_statistics(path: str | os.PathLike) -> Checkpoint:
    """A statistics file (one ``.safetensors``, or a sharded one named by its ``.index.json``), with
    errors that name it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {path} does not exist")
    try:
        return Checkpoint(path)
    except (OSError, ValueError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a readable statistics file (corrupt or truncated): {err}") from err


def describe_statistics(path: str | os.PathLike, tensors: bool = False) -> str:
    """What a statistics file holds (a Fisher, mask Fisher or Gram file, one file or sharded), readable
    without any model: its header (the fingerprint, mask layout and Gram maps summarized), how many
    tensors of which dtypes and how many values, their total, and with
    ``tensors`` one line per tensor (shape, dtype, sum, max). Tensors are read one at a time."""
    lines = [str(path)]
    metadata = read_fisher_metadata(path)
    for key in sorted(metadata):
        value = metadata[key]
        if key == "model_fingerprint" and isinstance(value, dict):
            value = f"{len(value)} tensors fingerprinted"
        elif key == "mask_layout" and isinstance(value, dict):
            value = f"{len(value)} mask sites"
        elif key == "gram_keys" and isinstance(value, dict):
            value = f"{len(value)} weights use {len(set(value.values()))} Grams"
        elif key == "gram_rows" and isinstance(value, dict):
            value = f"{min(value.values(), default=0):,}..{max(value.values(), default=0):,} rows per Gram"
        lines.append(f"  {key}: {value}")
    with open_statistics(path) as file:
        names = file.keys()
        dtypes = sorted({str(file.dtype(n)).replace("torch.", "") for n in names})
        total, count, rows = 0.0, 0, []
        for name in names:
            values = file.read_tensor(name)
            count += values.numel()
            subtotal = float(values.double().sum()) if values.numel() else 0.0
            total += subtotal
            if tensors:
                peak = float(values.max()) if values.numel() else float("nan")
                rows.append(f"    {name}  {tuple(values.shape)}  {str(values.dtype).replace('torch.', '')}  "
                            f"sum {subtotal:.6g}  max {peak:.6g}")
    lines.append(f"  tensors: {len(names)} ({', '.join(dtypes)}), {count:,} values, sum {total:.6g}")
    return "\n".join(lines + rows)
