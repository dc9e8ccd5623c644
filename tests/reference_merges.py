"""Slow, obviously-correct merges written from the papers' definitions, one element at a time in
float64 Python numbers. They share no code with the package (DARE's hash is re-implemented here)."""

from __future__ import annotations

import math
import zlib

import torch


def _elements(t: torch.Tensor) -> list[float]:
    return [float(x) for x in t.double().reshape(-1)]


def _tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).reshape(like.shape)


def task_arithmetic(base: dict, models: list[dict], scales: list[float]) -> dict:
    """θ = θ_0 + Σ_i λ_i (θ_i − θ_0) (Ilharco et al. 2023, eq. 1)."""
    out = {}
    for name, b in base.items():
        b0, thetas = _elements(b), [_elements(m[name]) for m in models]
        out[name] = _tensor([b0[j] + sum(lam * (t[j] - b0[j]) for lam, t in zip(scales, thetas))
                             for j in range(len(b0))], b)
    return out


def dare_keep(name: str, index: int, model: int, seed: int, p: float) -> bool:
    """The package's documented hash, in Python integers."""
    m32 = 0xFFFFFFFF
    key = (seed * 0x9E3779B1 + (model + 1) * 0x85EBCA77 + zlib.crc32(name.encode())) & m32
    x = (index ^ key) & m32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & m32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & m32
    x ^= x >> 16
    return x >> 8 >= int(p * 2**24)  # the top 24 bits against ⌊p · 2²⁴⌋


def task_vectors(base: dict, models: list[dict], drop_rate: float = 0.0, seed: int = 0) -> list[dict]:
    """τ_i = θ_i − θ_0, DARE'd when ``drop_rate`` > 0: dropped entries 0, kept ones × 1/(1 − p)."""
    out = []
    for i, model in enumerate(models):
        tau = {}
        for name, b in base.items():
            values = [t - b0 for t, b0 in zip(_elements(model[name]), _elements(b))]
            if drop_rate > 0:
                values = [v / (1 - drop_rate) if dare_keep(name, j, i, seed, drop_rate) else 0.0
                          for j, v in enumerate(values)]
            tau[name] = values
        out.append(tau)
    return out


def ties(base: dict, models: list[dict], scales: list[float], top_k: float, per_tensor: bool = False,
         drop_rate: float = 0.0, seed: int = 0) -> dict:
    """TIES (Yadav et al. 2023, Algorithm 1): keep each τ_i's entries whose magnitude is at least its
    k-th largest (k = ⌈top_k% · n⌉, over the body or per tensor), elect sgn(Σ λ_i τ̂_i), average λ_i τ̂_i
    over the models whose non-zero entry has the elected sign."""
    vectors = task_vectors(base, models, drop_rate, seed)
    names = list(base)
    thresholds = []
    for tau in vectors:
        groups = [[n] for n in names] if per_tensor else [names]
        mine = {}
        for group in groups:
            magnitudes = sorted((abs(v) for n in group for v in tau[n]), reverse=True)
            k = math.ceil(top_k / 100 * len(magnitudes))
            threshold = 0.0 if k >= len(magnitudes) else magnitudes[k - 1]
            mine.update(dict.fromkeys(group, threshold))
        thresholds.append(mine)
    out = {}
    for name, b in base.items():
        b0 = _elements(b)
        merged = []
        for j in range(len(b0)):
            weighted = []
            for i, tau in enumerate(vectors):
                v = tau[name][j] if abs(tau[name][j]) >= thresholds[i][name] else 0.0
                weighted.append(scales[i] * v)
            total = sum(weighted)
            sign = (total > 0) - (total < 0)
            agreeing = [w for w in weighted if w != 0 and ((w > 0) - (w < 0)) == sign]
            merged.append(b0[j] + (sum(agreeing) / len(agreeing) if agreeing else 0.0))
        out[name] = _tensor(merged, b)
    return out


def fisher_average(models: list[dict], fishers: list[dict], weights: list[float]) -> dict:
    """Eq. 4: Σ λ_i F_i θ_i / Σ λ_i F_i (no entry below the floor here)."""
    total = sum(weights)
    lam = [w / total for w in weights]
    out = {}
    for name in fishers[0]:
        thetas, fs = [_elements(m[name]) for m in models], [_elements(f[name]) for f in fishers]
        out[name] = _tensor([sum(c * f[j] * t[j] for c, f, t in zip(lam, fs, thetas)) /
                             sum(c * f[j] for c, f in zip(lam, fs)) for j in range(len(thetas[0]))],
                            models[0][name])
    return out
