"""Output ensembling, the baseline merging is compared with (NeurIPS paper §3.1, fig. 2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def ensemble_outputs(outputs: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Average the members' predicted probabilities (``weights`` default to equal); returned as log
    probabilities, so anything that takes logits (argmax, metrics) takes them. A single-output head is
    a regression: its outputs are averaged as they are."""
    weights = [1.0 / len(outputs)] * len(outputs) if weights is None else list(weights)
    if outputs[0].shape[-1] == 1:
        return sum(w * o.float() for w, o in zip(weights, outputs))
    probs = sum(w * o.float().softmax(-1) for w, o in zip(weights, outputs))
    return probs.clamp_min(torch.finfo(torch.float32).tiny).log()
