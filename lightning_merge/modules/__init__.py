from lightning_merge.modules.finetune import FineTuneModule
from lightning_merge.modules.fisher import FisherEstimationModule

__all__ = ["FineTuneModule", "FisherEstimationModule"]
