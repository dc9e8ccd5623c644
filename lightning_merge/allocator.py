"""Keep freed memory in the process instead of handing it back to the system after every step.

glibc serves each allocation above its mmap threshold with fresh pages and unmaps them on free, and
trims the heap top the same way; the next step's tensors of the same size then page-fault their way
back in (measured on MiniLM, batch 16: ~35,000–50,000 minor faults per Fisher batch, ~11% of its
time, and ~7% of a training step's). Raising both thresholds lets freed blocks be reused, as the
jemalloc/tcmalloc set-ups PyTorch's CPU tuning guide recommends do. Peak memory is unchanged; what is
freed stays mapped until the process ends.

Only the ``lightning-merge`` command (and the benchmarks that compare its stages) calls this; using
the package from Python changes no global setting. ``LIGHTNING_MERGE_MALLOC=system`` leaves glibc as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit systems
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (Linux with glibc only). Returns whether it did."""
    if os.environ.get("LIGHTNING_MERGE_MALLOC") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
