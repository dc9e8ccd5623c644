"""The console script sets the process environment torch reads when it loads, and nothing else."""

import os
import subprocess
import sys

from lightning_merge.command import PROCESS_ENVIRONMENT, prepare_process


def test_defaults_are_set_and_a_users_own_value_is_kept(monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    prepare_process()
    assert os.environ["GOMP_SPINCOUNT"] == PROCESS_ENVIRONMENT["GOMP_SPINCOUNT"] == "1000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    prepare_process()
    assert os.environ["GOMP_SPINCOUNT"] == "300000"


def test_the_console_script_sets_it_before_torch_is_imported():
    """``lightning-merge`` is ``lightning_merge.command:console_main``: the environment is set first,
    then the CLI (and torch, whose OpenMP runtime reads it once, at load) is imported."""
    code = ("import os, sys; from lightning_merge import command; assert 'torch' not in sys.modules; "
            "command.prepare_process(); import torch; print(os.environ['GOMP_SPINCOUNT'])")
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[-1] == "1000"
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lightning-merge"]
    assert script.value == "lightning_merge.command:console_main"


def test_each_subcommand_gets_its_way_of_handing_back_memory(monkeypatch):
    from lightning_merge import allocator, cli, command

    seen = []
    monkeypatch.setattr(allocator, "keep_freed_memory", lambda: seen.append("keep"))
    monkeypatch.setattr(allocator, "return_freed_memory", lambda: seen.append("return"))
    monkeypatch.setattr(cli, "console_main", lambda: seen.append("cli"))
    for subcommand in ("fit", "merge", "inspect"):
        monkeypatch.setattr("sys.argv", ["lightning-merge", subcommand])
        command.console_main()
    assert seen == ["keep", "cli", "return", "cli", "cli"]
