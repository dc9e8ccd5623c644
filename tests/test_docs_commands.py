"""Every command in README.md and docs/ runs: here (offline, with a tiny model and local GLUE files
appended as overrides where the real one needs the hub), in test_quickstart (the quickstart and the
merge command on its outputs), or in CI itself (install and test commands)."""

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest

from lightning_merge.cli import main
from tests.docs_commands import ROOT, documented_commands, split_redirect
from tests.processes import run_in_group

#: commands run elsewhere, and where
ELSEWHERE = {
    "pip install": ".ci/run installs the project exactly so",
    "python -m pytest": ".ci/run runs the tests exactly so",
    "bash recipes/quickstart/run.sh": "tests/test_quickstart.py",
    "lightning-merge validate --config recipes/quickstart/merge.yaml": "tests/test_quickstart.py (on its outputs)",
    "lightning-merge merge --config configs/merge/streamed_fisher.yaml": "tests/test_quickstart.py (on its outputs)",
}
OFFLINE = {  # appended to each stage: tiny and short, same meaning
    "fit": ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
            "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"],
    "predict": ["--data.init_args.max_predict_examples=8", "--trainer.enable_progress_bar=false",
                "--trainer.accelerator=cpu"],
}


def elsewhere(command: str) -> str | None:
    return next((where for prefix, where in ELSEWHERE.items() if command.startswith(prefix)), None)


def test_every_documented_command_is_run_somewhere():
    commands = documented_commands()
    assert len(commands) >= 8
    unknown = [(doc, c) for doc, c in commands if elsewhere(c) is None and not c.startswith(
        ("lightning-merge fit", "lightning-merge predict", "python benchmarks/"))]
    assert not unknown, f"commands in the docs that no test runs: {unknown}"


def test_benchmark_commands_parse():
    for _, command in documented_commands():
        if command.startswith("python benchmarks/"):
            words, _ = split_redirect(command)
            run = run_in_group([sys.executable, *words[1:], "--dry-run"], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert run.returncode == 0 and "arguments accepted" in run.stdout, (command, run.stderr[-2000:])


def test_fit_and_predict_commands_run_in_order_from_a_clone(tmp_path, monkeypatch, tiny_bert, glue_dir):
    for folder in ("configs", "recipes"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    monkeypatch.chdir(tmp_path)
    tiny = {"fit": [f"--model.init_args.backbone.init_args.name_or_path={tiny_bert}"], "predict": []}
    ran = []
    for _, command in documented_commands():
        if elsewhere(command) or not command.startswith(("lightning-merge fit", "lightning-merge predict")):
            continue
        words, redirect = split_redirect(command)
        stage = words[1]
        args = [*words[1:], *tiny[stage], f"--data.init_args.data_dir={glue_dir}"]
        if "--print_config" not in words:
            args += OFFLINE[stage]
        if redirect:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed), pytest.raises(SystemExit):
                main(args)
            Path(redirect).write_text(printed.getvalue())
        else:
            main(args)
        ran.append(command)
    assert len(ran) >= 4
    assert (tmp_path / "runs/rte/export/lightning_merge.json").is_file()
    assert (tmp_path / "runs/rte/fisher.safetensors").is_file()
    assert (tmp_path / "runs/rte/gram.safetensors").is_file()
