"""A test's subprocess tree does not outlive the test: killed as a group on timeout."""

import subprocess

import pytest

from tests.processes import group_alive, run_in_group

KILL_AFTER_S = 2  # the command sleeps 300 s: it never finishes first, however slow the machine


def test_a_timed_out_subprocess_tree_is_gone(tmp_path):
    pid_file = tmp_path / "pids"
    # bash starts two sleepers (grandchildren of the test) and waits for them.
    script = f"sleep 300 & echo $! >> {pid_file}; sleep 300 & echo $! >> {pid_file}; echo $$ >> {pid_file}; wait"
    with pytest.raises(subprocess.TimeoutExpired):
        run_in_group(["bash", "-c", script], timeout=KILL_AFTER_S)
    pids = [int(p) for p in pid_file.read_text().split()]
    assert len(pids) == 3
    group = pids[-1]  # bash leads its own group (start_new_session)
    assert not group_alive(group)


def test_a_finished_command_leaves_no_background_process(tmp_path):
    pid_file = tmp_path / "pid"
    run = run_in_group(["bash", "-c", f"(sleep 300 & echo $! > {pid_file}); echo $$"])
    assert run.returncode == 0
    assert not group_alive(int(run.stdout.split()[-1]))
