"""lightning_merge: Fisher-weighted model merging (Matena & Raffel, NeurIPS 2022) with PyTorch Lightning.

Pipeline, one sub-package per stage: ``data`` → ``backbones`` → ``modules.FineTuneModule`` →
Fisher → merge → ``evaluation``.
"""

__version__ = "0.1.0"
