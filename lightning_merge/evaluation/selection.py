"""The selection protocol of a merge run, as plain functions on score tables (no Lightning).

Every candidate (a method's coefficients) is scored on the *selection* part of each evaluated task
(the first ``select_examples`` examples); each method's best candidate there is then scored on the
*held-out* rest and on extra evaluation sets (e.g. OOD shifts), so a reported held-out number did not
choose anything. Baselines (each model unmerged, the output ensemble) are scored everywhere.
With ``report: all`` every candidate is scored everywhere (WiSE-FT curves, NeurIPS paper §3.2).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import fmean

UNMERGED, ENSEMBLE = "unmerged", "ensemble"
SELECT, HELDOUT, FULL = "select", "heldout", "full"
BEST, ALL = "best", "all"

Unit = tuple[int, int, str]  # (evaluated model, evaluation set, part)


@dataclass
class Candidate:
    method: str
    coefficients: list[float] | None  # None for baselines, and for "best of" until selection decides
    units: list[Unit] = field(default_factory=list)
    resolved_from: str | None = None  # "best of <method>": its coefficients are chosen at run time


def split_selection(num_examples: int, select_examples: float) -> tuple[list[int], list[int]]:
    """The first ``select_examples`` positions (a fraction of the set when below 1) select; the rest is held out."""
    k = int(select_examples) if select_examples >= 1 else int(round(select_examples * num_examples))
    k = min(max(k, 1), num_examples)
    return list(range(k)), list(range(k, num_examples))


def plan_candidates(methods: Sequence[tuple[str, Sequence[Sequence[float]]]], baselines: Sequence[str],
                    evaluated: Sequence[int], num_sets: Mapping[int, int], has_heldout: Mapping[int, bool],
                    report: str = BEST, heldout_curves: bool = False) -> list[Candidate]:
    """Candidates in evaluation order: baselines, every (method, coefficients), then — for ``best`` —
    one "best of <method>" per method that scores the held-out part and the extra sets.
    ``heldout_curves``: every searched candidate is also scored on the held-out part (for the
    score-vs-λ plot only; selection still reads the selection part alone)."""
    selection = [(i, 0, SELECT) for i in evaluated]
    heldout = [(i, 0, HELDOUT) for i in evaluated if has_heldout[i]]
    rest = heldout + [(i, s, FULL) for i in evaluated for s in range(1, num_sets[i])]
    candidates = [Candidate(b, None, selection + rest) for b in baselines]
    searched_units = selection + (rest if report == ALL else heldout if heldout_curves else [])
    for name, coefficient_sets in methods:
        candidates += [Candidate(name, list(lam), list(searched_units)) for lam in coefficient_sets]
    if report == BEST and rest:
        candidates += [Candidate(name, None, rest, resolved_from=name) for name, _ in methods]
    return candidates


def searched(candidates: Sequence[Candidate], method: str) -> list[int]:
    return [c for c, cand in enumerate(candidates) if cand.method == method and cand.resolved_from is None]


def best_candidate(candidates: Sequence[Candidate], method: str, selection_score: Callable[[int], float],
                   prefer: Callable[[Candidate], float] | None = None) -> int:
    """The candidate of ``method`` with the highest selection score; NaN scores lose. Ties go to the
    highest ``prefer`` value when given (a merge run prefers the target's largest λ: the unmerged end),
    else to the first candidate."""
    pool = searched(candidates, method)
    if not pool:
        raise ValueError(f"no candidate of method {method!r}")

    def key(k: int):
        score = selection_score(pool[k])
        return (not math.isnan(score), score, prefer(candidates[pool[k]]) if prefer else 0.0, -k)

    return pool[max(range(len(pool)), key=key)]


Metrics = Callable[[int, int, Sequence[tuple[int, str]]], dict[str, float]]  # (model, set, [(candidate, part)])


def result_row(candidates: Sequence[Candidate], c: int, rest: int | None, evaluated: Sequence[int],
               model_names: Sequence[str], set_names: Mapping[int, Sequence[str]], metrics: Metrics) -> dict:
    """Reported numbers of candidate ``c``; ``rest`` is the candidate that scored its held-out part and
    extra sets (the "best of" run after selection), if not ``c`` itself."""
    rest = c if rest is None else rest
    row: dict[str, object] = {"method": candidates[c].method, "coefficients": candidates[c].coefficients}
    selection, heldout, full = [], [], []
    for i in evaluated:
        parts = {"selection": metrics(i, 0, [(c, SELECT)]), "heldout": metrics(i, 0, [(rest, HELDOUT)])}
        selection.append(parts["selection"]["score"])
        heldout.append(parts["heldout"]["score"])
        values = metrics(i, 0, [(c, SELECT), (rest, HELDOUT)])
        full.append(values["score"])
        row.update({f"{model_names[i]}/{k}": v for k, v in values.items()})
        for part, part_values in parts.items():  # every metric (accuracy, F1, …) of each part too
            row.update({f"{model_names[i]}/{part}_{k}": v for k, v in part_values.items()})
        for s, set_name in enumerate(set_names[i][1:], start=1):
            row.update({f"{model_names[i]}/{set_name}/{k}": v for k, v in metrics(i, s, [(rest, FULL)]).items()})
    row.update(selection_score=fmean(selection), heldout_score=fmean(heldout), full_score=fmean(full))
    return row


def result_tables(candidates: Sequence[Candidate], methods: Sequence[str], baselines: Sequence[str], report: str,
                  evaluated: Sequence[int], model_names: Sequence[str], set_names: Mapping[int, Sequence[str]],
                  metrics: Metrics, selection_score: Callable[[int], float],
                  prefer: Callable[[Candidate], float] | None = None) -> tuple[list[dict], list[dict]]:
    """``(search, rows)``: every searched candidate's selection score, and the reported rows (baselines,
    then each method's selected candidate — or every candidate with ``report: all``)."""
    search = [{"method": candidates[c].method, "coefficients": candidates[c].coefficients,
               "selection_score": selection_score(c),
               "heldout_score": fmean(  # NaN unless scored there (heldout_curves, report: all)
                   [metrics(i, 0, [(c, HELDOUT)])["score"] for i in evaluated])}
              for m in methods for c in searched(candidates, m)]
    row = lambda c, rest=None: result_row(candidates, c, rest, evaluated, model_names, set_names, metrics)  # noqa: E731
    rows = [row(c) for c, cand in enumerate(candidates) if cand.method in baselines]
    for r in rows:
        if r["method"] == UNMERGED and len(evaluated) > 1:  # the models alone: their spread beside their mean
            scores = [r[f"{model_names[i]}/heldout_score"] for i in evaluated]
            center = fmean(scores)  # NaN without a held-out part (statistics.stdev fails on NaN)
            r["heldout_std"] = math.sqrt(sum((x - center) ** 2 for x in scores) / (len(scores) - 1))
    for method in methods:
        if report == ALL:
            rows += [row(c) for c in searched(candidates, method)]
        else:
            rest = next((c for c, cand in enumerate(candidates) if cand.resolved_from == method), None)
            best = best_candidate(candidates, method, selection_score, prefer)
            rows.append(row(best, rest))
            tied = [c for c in searched(candidates, method) if selection_score(c) == selection_score(best)]
            rows[-1]["tied_candidates"] = len(tied)  # > 1: the selection could not tell these apart
    add_normalized(rows, [model_names[i] for i in evaluated])
    return search, rows


def add_normalized(rows: list[dict], tasks: Sequence[str]) -> None:
    """``normalized_heldout``: the mean over tasks of a row's held-out score on the task divided by the
    unmerged model's (FusionBench's normalized accuracy; paper 003 §4), when the unmerged row is there."""
    unmerged = next((r for r in rows if r["method"] == UNMERGED), None)
    if unmerged is None:
        return
    for row in rows:
        ratios = [row[f"{t}/heldout_score"] / unmerged[f"{t}/heldout_score"] for t in tasks
                  if unmerged[f"{t}/heldout_score"] and not math.isnan(unmerged[f"{t}/heldout_score"])]
        row["normalized_heldout"] = sum(ratios) / len(ratios) if ratios else math.nan
