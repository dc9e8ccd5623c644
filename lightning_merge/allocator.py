"""How the process hands freed memory back: kept for the next step (compute stages), or at once
(streamed merges, whose point is a bounded peak).

glibc serves each allocation above its mmap threshold with fresh pages and unmaps them on free, and
trims the heap top the same way; the next step's tensors of the same size then page-fault their way
back in (counted with ``getrusage`` on MiniLM, batch 16: 34,000–53,000 minor faults per exact Fisher
batch, ~11% of its time, and ~7% of a training step's). Raising both thresholds lets freed blocks be reused, as the
jemalloc/tcmalloc set-ups PyTorch's CPU tuning guide recommends do. Peak memory is unchanged; what is
freed stays mapped until the process ends.

A streamed merge wants the opposite: its peak should be what it holds, not what it held. There every
block above 1 MB is mapped on its own and unmapped when freed (a fixed threshold also stops glibc from
raising it after the first large free), which keeps streamed RegMean within its memory allowance.

Only the ``lightning-merge`` console script (:mod:`lightning_merge.command`) and the benchmarks that
measure its stages call these; using the package from Python changes no global setting.
``LIGHTNING_MERGE_MALLOC=system`` leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 1 << 30
_RETURN_THRESHOLD = 1 << 20


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (Linux with glibc only). Returns whether it did."""
    return _mallopt((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def return_freed_memory() -> bool:
    """Map every block above 1 MB on its own, so that freeing it returns it (a fixed threshold)."""
    return _mallopt((_M_MMAP_THRESHOLD, _RETURN_THRESHOLD),)


def _mallopt(*settings: tuple[int, int]) -> bool:
    if os.environ.get("LIGHTNING_MERGE_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return all(bool(mallopt(option, value)) for option, value in settings)
