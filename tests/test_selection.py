"""The selection protocol on made-up score tables, without Lightning or models."""

import math

from lightning_merge.evaluation.selection import (
    ALL,
    BEST,
    HELDOUT,
    SELECT,
    UNMERGED,
    best_candidate,
    plan_candidates,
    result_tables,
    split_selection,
)


def test_split_selection_counts_and_fractions():
    assert split_selection(10, 4) == ([0, 1, 2, 3], [4, 5, 6, 7, 8, 9])
    assert split_selection(10, 0.5) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert split_selection(3, 100) == ([0, 1, 2], [])


def test_plan_scores_candidates_on_selection_and_only_the_best_on_the_rest():
    cands = plan_candidates([("fisher", [[0.2, 0.8], [0.5, 0.5]])], [UNMERGED], [0], {0: 2}, {0: True}, BEST)
    assert [c.method for c in cands] == [UNMERGED, "fisher", "fisher", "fisher"]
    assert cands[0].units == [(0, 0, SELECT), (0, 0, HELDOUT), (0, 1, "full")]
    assert cands[1].units == [(0, 0, SELECT)]
    assert cands[3].resolved_from == "fisher" and cands[3].units == [(0, 0, HELDOUT), (0, 1, "full")]
    every = plan_candidates([("fisher", [[0.2, 0.8], [0.5, 0.5]])], [], [0], {0: 1}, {0: True}, ALL)
    assert all(c.units == [(0, 0, SELECT), (0, 0, HELDOUT)] for c in every)
    curves = plan_candidates([("fisher", [[0.2, 0.8], [0.5, 0.5]])], [], [0], {0: 2}, {0: True}, BEST,
                             heldout_curves=True)
    assert [c.units for c in curves[:2]] == [[(0, 0, SELECT), (0, 0, HELDOUT)]] * 2  # no extra sets
    assert curves[2].resolved_from == "fisher" and curves[2].units == [(0, 0, HELDOUT), (0, 1, "full")]


def test_best_ignores_nan_and_breaks_ties_as_asked():
    cands = plan_candidates([("m", [[1, 0], [0.5, 0.5], [0, 1]])], [], [0], {0: 1}, {0: False})
    scores = {0: math.nan, 1: 0.7, 2: 0.7}
    assert best_candidate(cands, "m", scores.__getitem__) == 1  # first of the tied
    assert best_candidate(cands, "m", scores.__getitem__, prefer=lambda c: c.coefficients[0]) == 1
    assert best_candidate(cands, "m", scores.__getitem__, prefer=lambda c: -c.coefficients[0]) == 2
    assert best_candidate(cands, "m", {0: math.nan, 1: math.nan, 2: math.nan}.__getitem__) == 0


def test_rows_report_held_out_scores_of_the_selected_candidate_and_normalize_by_unmerged():
    # Two tasks; candidate 1 wins selection (0.9) but is worse held out than its selection says.
    cands = plan_candidates([("avg", [[0.5, 0.5], [0.9, 0.1]])], [UNMERGED], [0, 1], {0: 1, 1: 1},
                            {0: True, 1: True}, BEST)
    table = {  # (candidate, task, part) -> score
        (0, 0, SELECT): 0.8, (0, 0, HELDOUT): 0.8, (0, 1, SELECT): 0.6, (0, 1, HELDOUT): 0.5,
        (1, 0, SELECT): 0.5, (1, 1, SELECT): 0.5, (2, 0, SELECT): 0.9, (2, 1, SELECT): 0.9,
        (3, 0, HELDOUT): 0.4, (3, 1, HELDOUT): 0.25,
    }

    table[(1, 1, HELDOUT)] = 0.7  # as if scored there (heldout_curves)

    def metrics(i, s, parts):
        values = [table[(c, i, part)] for c, part in parts if (c, i, part) in table]
        score = sum(values) / len(values) if values else math.nan
        return {"score": score, "accuracy": score}

    def selection(c):
        return (table[(c, 0, SELECT)] + table[(c, 1, SELECT)]) / 2

    search, rows = result_tables(cands, ["avg"], [UNMERGED], BEST, [0, 1], ["a", "b"], {0: ["a"], 1: ["b"]},
                                 metrics, selection)
    assert [r["selection_score"] for r in search] == [0.5, 0.9]
    assert math.isnan(search[0]["heldout_score"]) and math.isnan(search[1]["heldout_score"])  # task 0 not scored
    table[(1, 0, HELDOUT)] = 0.6
    search, _ = result_tables(cands, ["avg"], [UNMERGED], BEST, [0, 1], ["a", "b"], {0: ["a"], 1: ["b"]},
                              metrics, selection)
    assert search[0]["heldout_score"] == (0.6 + 0.7) / 2 and math.isnan(search[1]["heldout_score"])
    unmerged, avg = rows
    assert avg["coefficients"] == [0.9, 0.1] and avg["selection_score"] == 0.9 and avg["tied_candidates"] == 1
    assert avg["heldout_score"] == (0.4 + 0.25) / 2  # the "best of" run's held-out scores, not selection's
    assert avg["a/heldout_score"] == 0.4 and unmerged["b/heldout_score"] == 0.5
    # every metric per part: selection from the selected candidate, held-out from the "best of" run
    assert avg["a/selection_accuracy"] == 0.9 and avg["a/heldout_accuracy"] == 0.4
    assert avg["b/accuracy"] == (0.9 + 0.25) / 2
    assert math.isclose(avg["normalized_heldout"], (0.4 / 0.8 + 0.25 / 0.5) / 2)
    assert unmerged["normalized_heldout"] == 1.0
