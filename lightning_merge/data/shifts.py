"""Named distribution shifts, as deterministic image transforms on ``(C, H, W)`` float tensors in [0, 1].

They turn one image set into an in-distribution (IID) set and several out-of-distribution (OOD)
sets, which is what the WiSE-FT comparison (NeurIPS paper §3.2, fig. 3) needs offline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torchvision.transforms.v2.functional as TF

Shift = Callable[[torch.Tensor, int], torch.Tensor]  # (image, example index) -> image


def _rotate(image: torch.Tensor, index: int, degrees: float = 30.0) -> torch.Tensor:
    return TF.rotate(image, degrees)


def _noise(image: torch.Tensor, index: int, std: float = 0.25) -> torch.Tensor:
    # Seeded by the example index so the OOD set is the same in every epoch and on every rank.
    generator = torch.Generator().manual_seed(index)
    return (image + std * torch.randn(image.shape, generator=generator)).clamp(0, 1)


def _invert(image: torch.Tensor, index: int) -> torch.Tensor:
    return 1.0 - image


def _blur(image: torch.Tensor, index: int, sigma: float = 1.0) -> torch.Tensor:
    return TF.gaussian_blur(image, kernel_size=[3, 3], sigma=[sigma, sigma])


SHIFTS: dict[str, Shift] = {"rotate": _rotate, "noise": _noise, "invert": _invert, "blur": _blur}
#: what a config may name (checked by the CLI at parse time); the first four are "no shift"
ShiftName = Literal["none", "original", "iid", "rotate", "noise", "invert", "blur"]


def get_shift(name: str | None) -> Shift | None:
    """The shift called ``name`` (``None``, ``"none"``, ``"original"`` or ``"iid"``: no shift)."""
    if name is None or name in ("none", "original", "iid"):
        return None
    if name not in SHIFTS:
        raise ValueError(f"Unknown distribution shift {name!r}; known shifts: {', '.join(SHIFTS)} (or none)")
    return SHIFTS[name]
