"""The README's main command, reduced to a couple of batches per stage."""

import csv
import json
import os
import subprocess
from pathlib import Path

from lightning_merge.fisher import read_fisher_metadata

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "finetune_shifted", "finetune_noise")


def test_quickstart_runs_every_stage_and_skips_finished_ones(tmp_path):
    env = {**os.environ, "OUT_DIR": str(tmp_path), "EPOCHS_SCALE": "0.1",
           "EXTRA_ARGS": "--trainer.limit_train_batches 2 --trainer.limit_val_batches 1 "
                         "--trainer.enable_progress_bar false",
           "FISHER_ARGS": "--data.init_args.max_predict_examples 24 --trainer.enable_progress_bar false",
           "MERGE_ARGS": "--model.init_args.search.init_args.points 3 --trainer.enable_progress_bar false"}
    run = subprocess.run(["bash", str(ROOT / "recipes/quickstart/run.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in STAGES:
        manifest = json.loads((tmp_path / stage / "export" / "lightning_merge.json").read_text())
        assert manifest["family"] == "timm_vit" and manifest["num_labels"] == 10
        for kind in ("full", "mask"):
            meta = read_fisher_metadata(tmp_path / "fisher" / f"{stage}.{kind}.safetensors")
            assert meta["num_examples"] == 24 and meta["kind"] == kind
    merge = {r["method"]: r for r in csv.DictReader((tmp_path / "merge" / "results.csv").open())}
    assert set(merge) == {"unmerged", "ensemble", "isotropic", "fisher", "mask_fisher"}
    assert all(0 <= float(r["heldout_score"]) <= 1 for r in merge.values())
    wise_ft = list(csv.DictReader((tmp_path / "wise_ft" / "results.csv").open()))
    assert sum(r["method"] == "fisher" for r in wise_ft) == 3 and "rotated/noise/accuracy" in wise_ft[0]
    for plot in ("merge/score_vs_lambda.png", "wise_ft/iid_vs_ood.png"):
        assert (tmp_path / plot).stat().st_size > 0
    assert (tmp_path / "merge" / "best_model" / "rotated" / "lightning_merge.json").is_file()
    assert "mask_fisher" in run.stdout  # the closing table
    again = subprocess.run(["bash", str(ROOT / "recipes/quickstart/run.sh")], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done") == 11
