"""The README's main command, reduced to a couple of batches per stage."""

import json
import os
import subprocess
from pathlib import Path

from lightning_merge.fisher import read_fisher_metadata

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_runs_every_stage_and_skips_finished_ones(tmp_path):
    env = {**os.environ, "OUT_DIR": str(tmp_path), "EPOCHS_SCALE": "0.1",
           "EXTRA_ARGS": "--trainer.limit_train_batches 2 --trainer.limit_val_batches 1 "
                         "--trainer.enable_progress_bar false",
           "FISHER_ARGS": "--data.init_args.max_predict_examples 24 --trainer.enable_progress_bar false"}
    run = subprocess.run(["bash", str(ROOT / "recipes/quickstart/run.sh")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in ("pretrain", "finetune_shifted"):
        manifest = json.loads((tmp_path / stage / "export" / "lightning_merge.json").read_text())
        assert manifest["family"] == "timm_vit" and manifest["num_labels"] == 10
        for kind in ("full", "mask"):
            meta = read_fisher_metadata(tmp_path / "fisher" / f"{stage}.{kind}.safetensors")
            assert meta["num_examples"] == 24 and meta["kind"] == kind
    again = subprocess.run(["bash", str(ROOT / "recipes/quickstart/run.sh")], env=env, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("already done") == 6
