"""The slow, obviously-correct diagonal Fisher (NeurIPS paper eq. 2): one example and one label at a
time, plain autograd of the log-likelihood itself. It shares no code with the package's engine (no
logit directions), so a bug there cannot hide here."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def reference_fisher_sums(model: nn.Module, forward: Callable[[int], torch.Tensor], num_examples: int,
                          variant: str = "exact", labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``Σ_i E_y (∇θ log p(y|x_i))²`` (not yet divided by N), for ``exact`` or ``empirical``.

    ``forward(i)`` returns the logits ``(1, C)`` of example ``i`` alone. One output is a Gaussian of
    unit variance, ``log p(y|x) = −(y − z)²/2``: ``empirical`` differentiates it at the true ``y``;
    ``exact`` uses ``E_{y~N(z,1)} (∂/∂θ log p)² = E (y − z)² (∂z/∂θ)² = (∂z/∂θ)²``.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for i in range(num_examples):
        logits = forward(i)[0]
        if logits.dim() == 2:  # several outputs (a masked LM's positions): log p(y|x) = Σ_t log p(y_t|x)
            if variant != "empirical":
                raise ValueError("the reference handles several outputs per example for `empirical` only")
            keep = labels[i] >= 0
            log_p = torch.log_softmax(logits.double(), -1)[keep]
            weighted = [(1.0, log_p.gather(1, labels[i][keep].unsqueeze(1)).sum())]
        elif logits.numel() == 1:
            z = logits[0].double()
            if variant == "empirical":
                weighted = [(1.0, -0.5 * (float(labels[i]) - z) ** 2)]
            else:
                weighted = [(1.0, z)]
        else:
            log_p = torch.log_softmax(logits.double(), -1)
            classes = range(len(log_p)) if variant == "exact" else [int(labels[i])]
            weighted = [(log_p[c].exp().item() if variant == "exact" else 1.0, log_p[c]) for c in classes]
        for weight, target in weighted:
            grads = torch.autograd.grad(target, list(params.values()), retain_graph=True, allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    sums[name] += weight * g.double() ** 2
    return sums
