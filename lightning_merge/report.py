"""Summaries across many merge runs (one ``results.json`` each), for recipes that merge many pairs.

    python -m lightning_merge.report normalized RUNS_DIR [--timings timings.csv] [--out summary.csv]

``normalized`` (paper 003 §4): for every run, each evaluated task's score under a method divided by
that task's unmerged score, averaged over the run's tasks; then the median over runs, per method and
per group (the run's parent folder, e.g. the number of Fisher examples). Prints a table, writes CSV.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from lightning_merge.atomic import staged_file


def normalized_scores(results: dict) -> dict[str, float]:
    """Method → mean over evaluated tasks of (task score ÷ the task's unmerged score)."""
    rows = {r["method"]: r for r in results["results"]}
    if "unmerged" not in rows:
        raise ValueError("a normalized score needs the `unmerged` baseline in the run")
    names = [n for n in results["facts"]["names"] if f"{n}/score" in rows["unmerged"]]
    out = {}
    for method, row in rows.items():
        if method == "unmerged":
            continue
        ratios = [row[f"{n}/score"] / rows["unmerged"][f"{n}/score"] for n in names
                  if row.get(f"{n}/score") is not None and rows["unmerged"][f"{n}/score"]]
        if ratios:
            out[method] = sum(ratios) / len(ratios)
    return out


def summarize(runs_dir: Path) -> list[dict]:
    grouped: dict[tuple[str, str], list[float]] = defaultdict(list)
    for path in sorted(runs_dir.rglob("results.json")):
        group = path.parent.parent.name
        for method, value in normalized_scores(json.loads(path.read_text())).items():
            grouped[(group, method)].append(value)
    if not grouped:
        raise ValueError(f"no results.json under {runs_dir}")
    return [{"group": g, "method": m, "runs": len(v), "median_normalized": statistics.median(v),
             "min": min(v), "max": max(v)} for (g, m), v in sorted(grouped.items())]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["normalized"])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--timings", type=Path, help="CSV with columns task,kind,examples,seconds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    rows = summarize(args.runs_dir)
    if args.timings and args.timings.is_file():
        seconds = defaultdict(list)
        for t in csv.DictReader(args.timings.open()):
            seconds[(t["examples"], t["kind"])].append(float(t["seconds"]))
        kind_of = {"fisher": "full", "mask_fisher": "mask"}
        for row in rows:
            spent = seconds.get((row["group"], kind_of.get(row["method"], "")))
            row["fisher_seconds_per_model"] = statistics.mean(spent) if spent else ""
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    sys.stdout.write(table.getvalue())
    if args.out:
        with staged_file(args.out) as tmp:
            tmp.write_text(table.getvalue())


if __name__ == "__main__":
    main()
