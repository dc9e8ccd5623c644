"""What the ``lightning-merge`` command leaves out of a run's output: lines that say nothing about the
run (adverts, accelerator inventories on machines without one, warnings about the libraries' own
deprecations, per-map progress bars), so that what is printed is the run itself.

Only the console command installs this; using the package from Python changes no global setting.
"""

from __future__ import annotations

import logging
import re
import warnings

_NOISE = re.compile(
    r"💡 Tip|^(GPU|TPU|HPU) available: False|^Seed set to|Loading `train_dataloader` to estimate"
    r"|was configured so \d+ batch|^You are using a CUDA device|LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES"
    # a stage's own summary: the command prints it again as its last line
    r"|^Exported the fine-tuned |^Wrote the \w+ \w+ Fisher of |^Wrote .*results\.json\)"
)
_WARNINGS = (
    r".*tensorboardX.*",  # Lightning's note on its own former dependency
    r".*isinstance\(treespec, LeafSpec\).*",  # Lightning's use of a torch API it deprecates itself
    r".*predict returned None.*",  # the Fisher stage writes files, not predictions
    r".*is smaller than the logging interval.*",
    r".*does not have many workers which may be a bottleneck.*",  # 2-core machines: workers cost more
    r".*The `srun` command is available.*",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOISE.search(record.getMessage())


def install() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.accelerators.cuda"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    for pattern in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        import datasets

        datasets.disable_progress_bars()  # one bar per `map` call of every split; the stage has its own
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    from transformers.utils import logging as hf_logging

    # Loading reports (e.g. a new head's weights "MISSING") are replaced by one line of the backbone's.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
