"""Subprocesses for tests: each runs in its own process group, and the whole group is killed when the
call returns, times out or is interrupted, so no test leaves a process behind."""

from __future__ import annotations

import os
import signal
import subprocess


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_in_group(cmd: list[str], timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a new session (its own process group).

    On a timeout (``subprocess.TimeoutExpired``) or any other exception the whole group — the command
    and every process it started — is killed before the exception propagates; after a normal exit,
    whatever the command left running in its group is killed too.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        _kill_group(proc.pid)
        proc.communicate()
        raise
    _kill_group(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
