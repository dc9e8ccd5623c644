"""Which logit-space directions to back-propagate for each Fisher variant (plain tensor math).

Every variant of the diagonal Fisher (NeurIPS paper eq. 2 / arXiv eq. 3) is, per example ``i``,
``Σ_k (J_iᵀ v_ik)²`` where ``J_i = ∂z_i/∂θ`` is the Jacobian of the logits ``z_i`` and ``v_ik`` are
directions in logit space, because ``∇θ log p(y|x_i) = J_iᵀ(e_y − p_i)`` for a softmax output:

* ``exact``: ``E_{y~p}[(∇ log p_y)²] = diag(J_iᵀ (diag p_i − p_i p_iᵀ) J_i)``. That C×C matrix is
  positive semi-definite with rank ≤ C−1 (the all-ones vector is in its null space), so its
  eigenvectors scaled by √eigenvalue give the *exact* expectation with C−1 backward passes.
* ``sampled``: ``k`` labels drawn from the model's own ``p_i``, directions ``(e_y − p_i)/√k``.
* ``empirical``: the true label, ``e_y − p_i`` (the "empirical Fisher": a different quantity).
* one output (regression, Gaussian likelihood of unit variance, ``log p(y|x) = −(y − z)²/2 + const``):
  ``∇θ log p = ∂z/∂θ · (y − z)``. ``exact``: ``E_{y~N(z,1)} (y − z)² = 1``, the direction is ``1``;
  ``sampled``: ``k`` draws ``y ~ N(z, 1)``, directions ``(y − z)/√k = ε/√k`` with ``ε ~ N(0, 1)``;
  ``empirical``: the true target, direction ``y − z``.

Returned shape: ``(K, B, C)``; each ``[k]`` is one ``grad_outputs`` for the logits.
"""

from __future__ import annotations

import torch

from lightning_merge.data.batch import IGNORE  # label of an output that is not part of the example

VARIANTS = ("exact", "sampled", "empirical")


def exact_directions(logits: torch.Tensor) -> torch.Tensor:
    """``(C−1, B, C)`` directions whose squared Jacobian products sum to the exact expectation."""
    p = torch.softmax(logits.detach().double(), dim=-1)
    covariance = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending; the first is the null direction
    scaled = eigenvectors[..., 1:] * eigenvalues[:, None, 1:].clamp(min=0).sqrt()
    return scaled.permute(2, 0, 1).to(logits.dtype)


def sampled_directions(logits: torch.Tensor, num_samples: int, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
    """``(k, *batch, C)``: ``(e_y − p)/√k`` for ``k`` labels ``y ~ p(y|x)`` per output (per example,
    or per masked position of a masked LM, whose log-likelihood is the sum over its positions)."""
    # e_y − p in float64: where p_y ≈ 1 (CLIP's temperature of 100) 1 − p_y in float32 keeps few digits
    p = torch.softmax(logits.detach().double(), dim=-1)
    flat = p.reshape(-1, p.shape[-1]).float()
    labels = torch.multinomial(flat.cpu(), num_samples, replacement=True, generator=generator).to(p.device)
    onehot = torch.nn.functional.one_hot(labels.T, p.shape[-1]).to(p.dtype)  # (k, outputs, C)
    return ((onehot.reshape(num_samples, *p.shape) - p) / num_samples**0.5).to(logits.dtype)


def empirical_directions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(1, *batch, C)``: ``e_y − p`` for the true labels."""
    p = torch.softmax(logits.detach().double(), dim=-1)  # float64, as in sampled_directions
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), p.shape[-1]).to(p.dtype)
    return (onehot - p).unsqueeze(0).to(logits.dtype)


def gaussian_directions(outputs: torch.Tensor, variant: str, targets: torch.Tensor | None = None,
                        num_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """One output with a unit-variance Gaussian likelihood (regression heads): ``(K, B, 1)``."""
    if variant == "exact":
        return torch.ones(1, *outputs.shape, dtype=outputs.dtype, device=outputs.device)
    if variant == "sampled":
        noise = torch.randn(num_samples, *outputs.shape, generator=generator, dtype=torch.float32)
        return (noise / num_samples**0.5).to(outputs.device, outputs.dtype)
    if targets is None:
        raise ValueError("the empirical Fisher needs the true targets")
    return (targets.to(outputs.dtype).reshape(outputs.shape) - outputs.detach()).unsqueeze(0)


def logit_directions(logits: torch.Tensor, variant: str, labels: torch.Tensor | None = None,
                     num_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """Directions for ``variant``. Outputs whose label is ``-100`` (the padding slots of a masked LM's
    masked positions) get zero directions: they are not part of any example's likelihood."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown Fisher variant {variant!r}; choose one of {VARIANTS}")
    if logits.shape[-1] == 1:
        directions = gaussian_directions(logits, variant, labels, num_samples, generator)
    elif variant == "exact":
        directions = exact_directions(logits)
    elif variant == "sampled":
        directions = sampled_directions(logits, num_samples, generator)
    elif labels is None:
        raise ValueError("the empirical Fisher needs the true labels")
    else:
        directions = empirical_directions(logits, labels)
    if labels is not None and labels.shape == logits.shape[:-1] and (labels == IGNORE).any():
        directions = directions * (labels != IGNORE).unsqueeze(-1).to(directions.dtype)
    return directions
