"""The ``lightning-merge`` console script: the process-wide settings (the environment torch reads
when it loads, then how freed memory is handed back: :mod:`lightning_merge.allocator`), then the CLI
(:mod:`lightning_merge.cli`). Calling the CLI from Python (``cli.main``) changes none of them.

``GOMP_SPINCOUNT=1000`` (unless set): an OpenMP thread that finishes its share of an operation spins
this many times for the next one, then sleeps. libgomp's default spins about 300,000 times, which on
a busy machine burns the time slices the thread doing the work needs; a few thousand keeps
back-to-back operations as fast as before. Measured with ``benchmarks/fisher_speed.py`` (MiniLM, C = 3):
exact Fisher / training 0.36–0.55 → 0.77 beside four busy processes on 2 cores, and 0.90 → 1.00 quiet
(``GOMP_SPINCOUNT=10000``: 0.53 and 1.01; ``OMP_WAIT_POLICY=PASSIVE``, no spinning: 0.90 and 0.81).
"""

from __future__ import annotations

import os
import sys

PROCESS_ENVIRONMENT = {"GOMP_SPINCOUNT": "1000"}


def prepare_process() -> None:
    """Set :data:`PROCESS_ENVIRONMENT` where the user has not; a no-op for what is set already. Only
    effective before torch (and its OpenMP runtime) is loaded."""
    for name, value in PROCESS_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def console_main() -> None:
    prepare_process()
    from lightning_merge import allocator, cli

    if sys.argv[1:2] == [cli.MERGE_STAGE]:
        allocator.return_freed_memory()  # a streamed merge's peak is what it holds
    elif sys.argv[1:2] != [cli.INSPECT]:
        allocator.keep_freed_memory()  # a compute stage's next step reuses what this one freed
    cli.console_main()
