"""Plain functions for fine-tuning regularizers (no Lightning inside)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def l2_to_reference(params: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """``‖θ − θ_0‖²`` summed over all given tensors (arXiv version §3.3.1 and appendix A: the squared
    L2 distance from the fine-tuned body to the pre-trained one, strength 3e-4 in the paper).

    Its gradient with respect to each ``θ`` is ``2(θ − θ_0)``; ``θ_0`` gets none.
    """
    if len(params) != len(reference):
        raise ValueError(f"{len(params)} parameters but {len(reference)} reference tensors")
    if not params:
        raise ValueError("l2_to_reference needs at least one parameter")
    return torch.stack([(p - r.detach()).pow(2).sum() for p, r in zip(params, reference)]).sum()
