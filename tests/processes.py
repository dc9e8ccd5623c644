"""Subprocesses for tests: each runs in its own process group, and the whole group is killed when the
call returns, times out or is interrupted, so no test leaves a process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_in_group(cmd: list[str], timeout: float | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a new session (its own process group).

    On a timeout (``subprocess.TimeoutExpired``) or any other exception the whole group — the command
    and every process it started — is killed before the exception propagates; after a normal exit,
    whatever the command left running in its group is killed too. Output goes through files, not
    pipes, so a background process holding them open cannot keep the call waiting.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True, **kwargs)
        try:
            proc.wait(timeout=timeout)
        except BaseException:
            _kill_group(proc.pid)
            proc.wait()
            raise
        _kill_group(proc.pid)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies waiting to be reaped are not)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return True
    return False
