"""Result tables of a merge run: CSV and JSON written atomically, a printable summary, and the plots."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path

from lightning_merge.atomic import staged_file

RESULTS_JSON = "results.json"
MAIN_COLUMNS = ("method", "coefficients", "selection_score", "heldout_score", "heldout_std", "full_score",
                "normalized_heldout")


def _atomic_write(path: Path, text: str) -> None:
    with staged_file(path) as tmp:
        tmp.write_text(text)


def _coefficients(value) -> str:
    return "" if value is None else ";".join(f"{c:.6g}" for c in value)


def _csv(rows: list[dict]) -> str:
    extra = sorted({k for r in rows for k in r} - set(MAIN_COLUMNS))
    columns = [c for c in MAIN_COLUMNS if any(c in r for r in rows)] + extra
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "coefficients": _coefficients(row.get("coefficients"))})
    return out.getvalue()


def format_table(rows: list[dict]) -> str:
    """The main columns as aligned text (what the run prints)."""
    keys = ["selection_score", "heldout_score", "full_score"]
    header = ["method", "coefficients", "selection", "held-out", "full"]
    if any("normalized_heldout" in r for r in rows):
        keys.append("normalized_heldout")
        header.append("held-out ÷ unmerged")
    def cell(r: dict, key: str) -> str:
        v = r.get(key, math.nan)
        text = "nan" if math.isnan(v) else f"{v:.4f}"
        if key == "heldout_score" and "heldout_std" in r:  # the models alone: mean ± their spread
            text += f" ± {r['heldout_std']:.4f}"
        return text

    lines = [[str(r["method"]), _coefficients(r.get("coefficients")) or "-", *(cell(r, k) for k in keys)]
             for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [header, *lines])


def write_results(output_dir: str | os.PathLike, rows: list[dict], search: list[dict], target: int = 0,
                  plot: bool = True, one_task: bool = False) -> str:
    """``results.csv`` (reported rows), ``search.csv`` (every candidate's selection score) and, when they
    apply, ``score_vs_lambda.png``, ``iid_vs_ood.png``, ``models_and_merges.png`` (``one_task``: every
    evaluated model is of one task, as in ensembling) and ``tasks.png`` (3+ evaluated models). Returns
    the table text. ``results.json`` is the stage's completion marker: :func:`write_completion_marker`
    writes it after everything else."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "results.csv", _csv(rows))
    _atomic_write(out / "search.csv", _csv(search))
    if plot:
        from lightning_merge import plotting

        several = len(search) > len({r["method"] for r in search})
        if several and all(len(r["coefficients"]) == 2 for r in search):
            plotting.score_vs_lambda(search, rows, target, out / "score_vs_lambda.png")
        if any(r.get("coefficients") is not None for r in rows) and plotting.ood_columns(rows):
            plotting.iid_vs_ood(rows, target, out / "iid_vs_ood.png")
        if one_task and len(plotting.task_columns(rows)) >= 2:
            plotting.models_and_merges(rows, out / "models_and_merges.png")
        if len(plotting.task_columns(rows)) >= 3:
            plotting.task_scores(rows, out / "tasks.png")
    return format_table(rows)


def write_completion_marker(output_dir: str | os.PathLike, rows: list[dict], search: list[dict],
                            facts: dict) -> Path:
    """``results.json``: every number of the run and its facts. Written last (after the tables, plots and
    the export), atomically, so its presence means the stage finished: recipes skip a stage by it."""
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731  (JSON has no NaN)
    payload = {"facts": facts, "results": [{k: clean(v) for k, v in r.items()} for r in rows],
               "search": [{k: clean(v) for k, v in r.items()} for r in search]}
    path = Path(output_dir) / RESULTS_JSON
    _atomic_write(path, json.dumps(payload, indent=2))
    return path
