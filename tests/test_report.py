"""The cross-run summary: per-task scores normalized by the unmerged ones, median over runs."""

import json
import math

import pytest

from lightning_merge.report import main, normalized_scores, summarize


def results(merged_a, merged_b, unmerged_a=0.8, unmerged_b=0.5):
    return {"facts": {"names": ["a", "b"]},
            "results": [{"method": "unmerged", "a/score": unmerged_a, "b/score": unmerged_b},
                        {"method": "fisher", "a/score": merged_a, "b/score": merged_b}]}


def test_normalized_score_is_the_mean_ratio_to_unmerged():
    assert normalized_scores(results(0.4, 0.5)) == pytest.approx({"fisher": (0.5 + 1.0) / 2})


def test_median_over_runs_per_group(tmp_path, capsys):
    for i, (a, b) in enumerate([(0.8, 0.5), (0.4, 0.5), (0.0, 0.5)]):
        run = tmp_path / "128" / f"pair{i}"
        run.mkdir(parents=True)
        (run / "results.json").write_text(json.dumps(results(a, b)))
    (row,) = summarize(tmp_path)
    assert row["group"] == "128" and row["runs"] == 3 and row["median_normalized"] == pytest.approx(0.75)
    (tmp_path / "t.csv").write_text("task,kind,examples,seconds\na,full,128,4\nb,full,128,6\n")
    main(["normalized", str(tmp_path), "--timings", str(tmp_path / "t.csv"), "--out", str(tmp_path / "s.csv")])
    assert "fisher_seconds_per_model" in capsys.readouterr().out
    assert (tmp_path / "s.csv").read_text().splitlines()[1].endswith(",5.0")


def test_score_plot_range_leaves_out_the_donor_end_but_keeps_baselines_and_curves():
    from lightning_merge.plotting import interesting_range

    # a λ grid from the donor end (0.30) to the target (0.64); the unmerged target scored 0.61
    low, high = interesting_range([[0.30, 0.60, 0.62, 0.63, 0.64], [0.35, 0.5, 0.55, 0.6, 0.66]], [0.61, math.nan])
    assert (low, high) == pytest.approx((0.55 - 0.011, 0.66 + 0.011))
    assert interesting_range([[0.5, 0.5]], []) == pytest.approx((0.49, 0.51))  # flat: a small band, not zero
