"""Stage 3b: statistics other than the Fisher that merges read — Gram matrices of linear layers'
inputs (RegMean), estimated with ``trainer.predict`` like the Fisher and stored the same way."""

from lightning_merge.statistics.gram import GramAccumulator, linear_layers, weight_keys
from lightning_merge.statistics.gram_file import GramInput, check_gram, save_gram

__all__ = ["GramAccumulator", "GramInput", "check_gram", "linear_layers", "save_gram", "weight_keys"]
