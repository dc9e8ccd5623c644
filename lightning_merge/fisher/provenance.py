"""Which model a statistics file belongs to: a cheap fingerprint of the model's weights, stored in the
file's header at estimation time and compared with the model it is paired with at merge time.

A Fisher of another checkpoint of the same architecture has the right names and shapes, so nothing
else would notice it; merged with it, eq. 4 silently weights the wrong parameters. The fingerprint
is, per parameter tensor, a short hash of its shape and of 64 of its values (four runs of 16 at fixed
places), read the same way from a model in memory or from a safetensors file (a few reads per tensor).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping

import torch

FINGERPRINT_KEY = "model_fingerprint"
_RUN = 16


def _runs(numel: int) -> list[tuple[int, int]]:
    starts = sorted({0, numel // 3, (2 * numel) // 3, max(numel - _RUN, 0)})
    return [(s, min(s + _RUN, numel)) for s in starts]


def tensor_digest(shape: torch.Size, read: Callable[[int, int], torch.Tensor]) -> str:
    """``read(start, stop)`` returns elements ``[start, stop)`` of the flattened tensor."""
    h = hashlib.sha256(repr(tuple(shape)).encode())
    for start, stop in _runs(torch.Size(shape).numel()):
        h.update(read(start, stop).detach().reshape(-1).to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def fingerprint_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The fingerprint of a model in memory (e.g. ``dict(model.named_parameters())``)."""
    return {name: tensor_digest(t.shape, lambda a, b, t=t: t.reshape(-1)[a:b]) for name, t in tensors.items()}


def fingerprint_reader(shapes: Mapping[str, torch.Size], read: Callable[[str, int, int], torch.Tensor],
                       names: list[str]) -> dict[str, str]:
    """The digests of ``names`` of a model read piecewise (e.g. from its safetensors file)."""
    return {n: tensor_digest(shapes[n], lambda a, b, n=n: read(n, a, b)) for n in names if n in shapes}


def check_provenance(metadata: Mapping[str, object], digests_of: Callable[[list[str]], dict[str, str]],
                     statistics: str, model: str) -> str | None:
    """Compare the fingerprint in a statistics file's header with the model's (``digests_of(names)``).

    Returns None when they agree, a note when the file has no fingerprint (written by an older
    version: nothing to compare), and raises ``ValueError`` naming both when they differ.
    """
    recorded = metadata.get(FINGERPRINT_KEY)
    if not isinstance(recorded, dict) or not recorded:
        return (f"{statistics} records no model fingerprint (written by an older version, or not by "
                f"FisherEstimationModule): cannot check that it belongs to {model}")
    actual = digests_of(sorted(recorded))
    missing = [n for n in recorded if n not in actual]
    differing = [n for n in recorded if n in actual and actual[n] != recorded[n]]
    if missing or differing:
        source = metadata.get("model_source", "unknown")
        raise ValueError(
            f"{statistics} was estimated on another model ({source}) than the one it is paired with ({model}): "
            f"{len(differing)} of {len(recorded)} fingerprinted tensors differ"
            f"{f' and {len(missing)} are missing' if missing else ''} (e.g. {(differing or missing)[0]!r}); "
            f"pair each model with its own statistics, or set check_provenance: false to use it anyway")
    return None
