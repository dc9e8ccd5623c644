"""The offline N-task merging recipe, reduced to a couple of batches per stage: every method runs and
the table has what the README promises (per-domain held-out scores, normalized scores, the plot)."""

import csv
import os
from pathlib import Path

from tests.processes import run_in_group

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"unmerged", "ensemble", "averaging", "task_arithmetic", "ties", "dare_ties", "fisher", "mask_fisher",
           "regmean"}


def test_multitask_digits_recipe_runs_every_method(tmp_path):
    env = {**os.environ, "OUT_DIR": str(tmp_path),
           "EXTRA_ARGS": "--trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1 "
                         "--trainer.enable_progress_bar false",
           "FISHER_ARGS": "--data.init_args.max_predict_examples 16 --trainer.enable_progress_bar false",
           "MERGE_ARGS": "--model.init_args.scale_search.init_args.values [0.5,1.0] "
                         "--model.init_args.select_examples 40 --trainer.enable_progress_bar false"}
    run = run_in_group(["bash", str(ROOT / "recipes/multitask_digits/run.sh")], env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "merge" / "results.csv").open())}
    assert set(rows) == METHODS
    for domain in ("rotate", "noise", "invert", "blur"):
        assert all(0 <= float(r[f"{domain}/heldout_score"]) <= 1 for r in rows.values())
    assert float(rows["unmerged"]["normalized_heldout"]) == 1.0
    assert rows["ties"]["coefficients"] in ("0.5;0.5;0.5;0.5", "1;1;1;1")
    assert (tmp_path / "merge" / "tasks.png").stat().st_size > 0
    assert (tmp_path / "merge" / "best_model" / "rotate" / "lightning_merge.json").is_file()
