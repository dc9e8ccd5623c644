"""Fisher files: safetensors, one float32 tensor per parameter name, facts about the estimate in the
header. Written to a temporary name and renamed, so a failed run never leaves half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from lightning_merge.tensor_files import SafetensorsWriter

REQUIRED_METADATA = ("num_examples", "variant")


def save_fisher(path: str | os.PathLike, fisher: dict[str, torch.Tensor], metadata: dict[str, object]) -> Path:
    """Write ``fisher`` (parameter name → mean squared gradient) with ``metadata`` in the header."""
    path = Path(path)
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise ValueError(f"Fisher metadata lacks {missing}")
    for name, value in fisher.items():
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ValueError(f"Fisher entry {name!r} has NaN, Inf or negative values; not writing {path}")
    # Sorted header and tensors, written by our own writer: safetensors' save_file orders the metadata
    # differently in every process, and a Fisher file must be the same bytes for the same inputs.
    header = {k: metadata[k] if isinstance(metadata[k], str) else json.dumps(metadata[k], sort_keys=True)
              for k in sorted(metadata)}
    names = sorted(fisher)
    writer = SafetensorsWriter(path, {n: (torch.float32, fisher[n].shape) for n in names}, header)
    try:
        for name in names:
            writer.write(name, fisher[name])
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    return path


def read_fisher_metadata(path: str | os.PathLike) -> dict[str, object]:
    """The header facts (numbers decoded), without reading any tensor."""
    with _open(path) as f:
        raw = f.metadata() or {}
    out: dict[str, object] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_fisher(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Load all (or the named) Fisher tensors; missing names and non-finite values are errors."""
    with _open(path) as f:
        available = set(f.keys())
        wanted = sorted(available) if names is None else names
        absent = [n for n in wanted if n not in available]
        if absent:
            raise KeyError(f"{path} has no Fisher for {absent[:8]}{' ...' if len(absent) > 8 else ''}")
        return {n: f.get_tensor(n) for n in wanted}


def _open(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fisher file {path} does not exist")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors Fisher file (corrupt or truncated): {err}") from err
