"""The ``lightning-merge`` console script: the process settings that must come before torch is
imported, then the CLI (:mod:`lightning_merge.cli`).

``GOMP_SPINCOUNT=1000`` (unless set): an OpenMP thread that finishes its share of an operation spins
this many times for the next one, then sleeps. libgomp's default spins about 300,000 times, which on
a busy machine burns the time slices the thread doing the work needs; a few thousand keeps
back-to-back operations as fast as before. Measured with ``benchmarks/fisher_speed.py`` (MiniLM, C = 3):
exact Fisher / training 0.53–0.55 → 0.77 beside four busy processes on 2 cores, and 0.90 → 1.00 quiet;
``OMP_WAIT_POLICY=PASSIVE`` (no spinning) gave 0.90 under load but 0.81 quiet.
"""

from __future__ import annotations

import os

PROCESS_ENVIRONMENT = {"GOMP_SPINCOUNT": "1000"}


def prepare_process() -> None:
    """Set :data:`PROCESS_ENVIRONMENT` where the user has not; a no-op for what is set already. Only
    effective before torch (and its OpenMP runtime) is loaded."""
    for name, value in PROCESS_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def console_main() -> None:
    prepare_process()
    from lightning_merge.cli import console_main as run

    run()
