"""The README's main command, reduced to a couple of batches per stage."""

import csv
import json
import os
from pathlib import Path

from lightning_merge.cli import main
from lightning_merge.fisher import read_fisher_metadata
from tests.docs_commands import documented_commands, split_redirect
from tests.processes import run_in_group

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("pretrain", "finetune_shifted", "finetune_noise")


def test_quickstart_runs_every_stage_and_skips_finished_ones(tmp_path):
    env = {**os.environ, "OUT_DIR": str(tmp_path), "EPOCHS_SCALE": "0.1",
           "EXTRA_ARGS": "--trainer.limit_train_batches 2 --trainer.limit_val_batches 1 "
                         "--trainer.enable_progress_bar false",
           "FISHER_ARGS": "--data.init_args.max_predict_examples 24 --trainer.enable_progress_bar false",
           "MERGE_ARGS": "--model.init_args.search.init_args.points 3 --trainer.enable_progress_bar false"}
    # No wall-clock limit: a loaded machine is slow, not wrong. The run has its own process group,
    # killed with it if the test is interrupted.
    run = run_in_group(["bash", str(ROOT / "recipes/quickstart/run.sh")], env=env)
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
    again = run_in_group(["bash", str(ROOT / "recipes/quickstart/run.sh")], env=env)
    assert again.returncode == 0 and again.stdout.count("already done") == 11
    readme_merge_command_runs_on(tmp_path)
    streamed_merge_command_runs_on(tmp_path)


def readme_merge_command_runs_on(outputs: Path) -> None:
    """The merge command README.md and docs/merging.md show, on this run's outputs (another output dir)."""
    shown = {c for _, c in documented_commands() if c.startswith("lightning-merge validate")}
    assert len(shown) == 1
    words, _ = split_redirect(shown.pop())
    main([*words[1:], f"--model.init_args.root_dir={outputs}", "--model.init_args.output_dir=readme_merge",
          "--model.init_args.export_dir=readme_merge/best", "--model.init_args.search.init_args.points=3",
          f"--trainer.default_root_dir={outputs / 'readme_merge'}", "--trainer.enable_progress_bar=false"])
    assert (outputs / "readme_merge" / "results.json").is_file()


def streamed_merge_command_runs_on(outputs: Path) -> None:
    """docs/merging.md's streamed merge, its paths moved under this run's outputs."""
    shown = [c for _, c in documented_commands() if c.startswith("lightning-merge merge")]
    assert len(shown) == 1
    words, _ = split_redirect(shown[0])
    fishers = ", ".join(str(outputs / "fisher" / f"{m}.full.safetensors") for m in STAGES[1:])
    main([*words[1:], f"--models=[{outputs}/finetune_shifted/export, {outputs}/finetune_noise/export]",
          f"--inputs={{fisher: [{fishers}]}}", f"--output={outputs}/merged_streamed"])
    assert (outputs / "merged_streamed" / "model.safetensors").is_file()
    assert (outputs / "merged_streamed" / "lightning_merge.json").is_file()
