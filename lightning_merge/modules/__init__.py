from lightning_merge.modules.finetune import FineTuneModule
from lightning_merge.modules.fisher import FisherEstimationModule
from lightning_merge.modules.gram import GramEstimationModule
from lightning_merge.modules.merge import MergeModule, ModelSpec

__all__ = ["FineTuneModule", "FisherEstimationModule", "GramEstimationModule", "MergeModule", "ModelSpec"]
