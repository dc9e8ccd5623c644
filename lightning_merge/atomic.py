"""Writing outputs so that a failure never leaves half a result, nor destroys the previous one.

Every output is first written under a hidden name beside its final one that says which process wrote
it (``.NAME.<pid>-<token>.tmp``), then renamed. A process that dies (SIGKILL, a full disk) leaves its
hidden file or folder behind; the next write of the same output removes the ones whose process is
gone, and puts back a previous output that was moved aside (``.NAME.<pid>.old``) but not yet replaced.
Files and folders get the permissions the user's umask gives any new file (not ``mkstemp``'s 0600).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _hidden_name(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}"


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove what dead processes left while writing ``path`` (hidden temporary files and folders);
    if ``path`` itself is missing but a dead process had moved the previous version aside, restore it.
    Returns what was removed or restored."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)(?:-[0-9a-f]+\.tmp.*|\.old)$")
    touched = []
    for sibling in path.parent.iterdir():
        match = pattern.match(sibling.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if sibling.name.endswith(".old") and not path.exists():
            sibling.rename(path)  # the previous output, moved aside by a run that died before replacing it
        elif sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        touched.append(sibling)
    return touched


def create_hidden_file(path: str | os.PathLike) -> tuple[int, Path]:
    """Open a new hidden temporary file beside ``path`` (umask permissions); returns (fd, its path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = path.parent / _hidden_name(path)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for any new file
    return fd, tmp


@contextmanager
def staged_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty staging folder beside ``directory``; when the block succeeds, it replaces
    ``directory`` (an existing one is removed only after the new one is in place); when it fails, the
    staging folder is deleted and ``directory`` is left as it was."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(directory)
    staging = directory.parent / _hidden_name(directory)
    staging.mkdir()  # mode 0777 less the umask
    try:
        yield staging
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.{os.getpid()}.old")
            directory.rename(retired)
            staging.rename(directory)
            shutil.rmtree(retired)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside ``path`` (same suffix, so writers that go by it still
    work); when the block succeeds it replaces ``path``, when it fails it is deleted."""
    path = Path(path)
    fd, tmp = create_hidden_file(path)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(directory: str | os.PathLike, what: str) -> None:
    """Fail now, not after hours of work, if ``directory`` cannot be created or written to."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = create_hidden_file(directory / ".write-check")
        os.close(fd)
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"cannot write the {what} to {directory}: {err.strerror or err}") from err
