"""Plots of merge results (matplotlib, PNG), in the style of the NeurIPS paper's figures 2 and 3."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lightning_merge.atomic import staged_file  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    try:
        with staged_file(path) as tmp:
            fig.savefig(tmp, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]


def interesting_range(curves: Sequence[Sequence[float]], baselines: Sequence[float]) -> tuple[float, float]:
    """A y-range for score-vs-λ curves that shows the differences that matter: from the lowest of the
    baselines and of each curve's median up to the highest point, padded by a tenth. Points far below
    (λ near the donor end, where a merge is plainly worse) fall outside instead of flattening the rest."""
    points = _finite(v for c in curves for v in c) + _finite(baselines)
    if not points:
        return 0.0, 1.0
    medians = [sorted(f)[len(f) // 2] for f in map(_finite, curves) if f]
    low, high = min(_finite(baselines) + medians or points), max(points)
    pad = 0.1 * (high - low) or 0.01
    return low - pad, high + pad


def score_vs_lambda(search: Sequence[dict], rows: Sequence[dict], target: int, path) -> Path:
    """Score against the target's coefficient λ, one line per method, baselines as dashed lines: the
    selection score, and beside it the held-out score when candidates were scored there
    (``heldout_curves``), on one y-range chosen by :func:`interesting_range`."""
    panels = [("selection_score", "selection part (chooses λ)")]
    if any(_finite([r.get("heldout_score", math.nan)]) for r in search):
        panels.append(("heldout_score", "held-out part (reported)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), sharey=True, squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in search))
    baselines = [r for r in rows if r.get("coefficients") is None]
    low, high = interesting_range([[r[k] for r in search] for k, _ in panels],
                                  [r.get(k, math.nan) for r in baselines for k, _ in panels])
    for ax, (key, title) in zip(axes[0], panels):
        hidden = 0
        for method in methods:
            points = sorted((r["coefficients"][target], r[key]) for r in search if r["method"] == method)
            ax.plot(*zip(*points), marker=".", label=method)
            hidden += sum(1 for _, y in points if y < low)
        for row in baselines:
            if _finite([row.get(key, math.nan)]):
                ax.axhline(row[key], linestyle="--", linewidth=1, color="grey")
                ax.annotate(row["method"], (0, row[key]), fontsize=8, va="bottom")
        ax.set_ylim(low, high)
        ax.set_title(title + (f"; {hidden} points below {low:.3f} not shown" if hidden else ""), fontsize=9)
        ax.set_xlabel("λ of the target model")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("score")
    axes[0][0].legend()
    return _save(fig, path)


def ood_columns(rows: Sequence[dict]) -> list[str]:
    """Score columns of the extra (shifted) evaluation sets: ``<task>/<set>/score``."""
    return sorted({k for r in rows for k in r if k.count("/") == 2 and k.endswith("/score")})


def iid_vs_ood(rows: Sequence[dict], target: int, path) -> Path:
    """WiSE-FT's picture (paper §3.2, fig. 3): IID score (``full_score``) against the mean OOD score,
    one curve per method over λ, baselines as single points."""
    columns = ood_columns(rows)
    fig, ax = plt.subplots(figsize=(6, 5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        xy = [(r["full_score"], sum(r[c] for c in columns) / len(columns)) for r in mine]
        if mine[0].get("coefficients") is None:
            ax.scatter(*zip(*xy), marker="x", label=method)
            continue
        ax.plot(*zip(*xy), marker="o", label=method)
        for r, (x, y) in zip(mine, xy):
            ax.annotate(f"{r['coefficients'][target]:.1f}", (x, y), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("IID score")
    ax.set_ylabel("OOD score (mean of " + ", ".join(c.split("/")[1] for c in columns) + ")")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gain_heatmap(gains: Sequence[Sequence[float]], targets: Sequence[str], donors: Sequence[str], path,
                 title: str = "score gain over the unmerged target") -> Path:
    """Target × donor matrix of gains (paper fig. 2/3 style for many pairwise merges)."""
    fig, ax = plt.subplots(figsize=(1 + 0.8 * len(donors), 1 + 0.6 * len(targets)))
    image = ax.imshow(gains, cmap="RdBu", vmin=-max(abs(g) for row in gains for g in row if not math.isnan(g)) or -1,
                      vmax=max(abs(g) for row in gains for g in row if not math.isnan(g)) or 1)
    ax.set_xticks(range(len(donors)), donors, rotation=45, ha="right")
    ax.set_yticks(range(len(targets)), targets)
    for y, row in enumerate(gains):
        for x, value in enumerate(row):
            if not math.isnan(value):
                ax.text(x, y, f"{value:+.1f}", ha="center", va="center", fontsize=7)
    ax.set_xlabel("donor")
    ax.set_ylabel("target")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def task_columns(rows: Sequence[dict]) -> list[str]:
    """Per-task held-out score columns: ``<task>/heldout_score``."""
    return sorted({k for r in rows for k in r if k.count("/") == 1 and k.endswith("/heldout_score")})


def task_scores(rows: Sequence[dict], path) -> Path:
    """Held-out score per task (groups) and method (bars), with each method's mean in the legend: the
    N-task comparison of merging methods."""
    columns = task_columns(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(columns)), 4))
    width = 0.8 / len(rows)
    for k, row in enumerate(rows):
        values = [row.get(c, math.nan) for c in columns]
        mean = sum(values) / len(values)
        ax.bar([j + (k - (len(rows) - 1) / 2) * width for j in range(len(columns))], values, width,
               label=f"{row['method']} ({mean:.3f})")
    ax.set_xticks(range(len(columns)), [c.split("/")[0] for c in columns])
    ax.set_ylabel("held-out score")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def models_and_merges(rows: Sequence[dict], path) -> Path:
    """Merging as an ensemble (NeurIPS paper §3.1, fig. 2): several models of one task, the held-out
    score of each alone (dots, with their mean as the bar) beside each merge and the output ensemble."""
    columns = task_columns(rows)
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 4))
    for k, row in enumerate(rows):
        ax.bar(k, row["heldout_score"], 0.6, alpha=0.8)
        ax.annotate(f"{row['heldout_score']:.3f}", (k, row["heldout_score"]), ha="center", va="bottom", fontsize=8)
        if row.get("coefficients") is None and row["method"] == "unmerged":
            ax.scatter([k] * len(columns), [row[c] for c in columns], color="black", s=12, zorder=3,
                       label="each model alone")
    scores = _finite(v for r in rows for v in [r["heldout_score"]] + [r.get(c, math.nan) for c in columns])
    if scores:
        pad = 0.1 * (max(scores) - min(scores)) or 0.01
        ax.set_ylim(min(scores) - 3 * pad, max(scores) + pad)
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=20)
    ax.set_ylabel("held-out score")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
