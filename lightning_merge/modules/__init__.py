from lightning_merge.modules.finetune import FineTuneModule

__all__ = ["FineTuneModule"]
