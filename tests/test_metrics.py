import pytest
import torch

from lightning_merge.data.glue_tasks import stsb_bucket_centers
from lightning_merge.evaluation import TaskMetrics


def _logits_for(preds, num_labels):
    return torch.nn.functional.one_hot(torch.tensor(preds), num_labels).float()


def test_accuracy_and_f1_mean_is_the_score():
    # preds 1 1 0 0 1, labels 1 0 0 1 1: acc 3/5; TP 2, FP 1, FN 1 -> F1 = 2/3
    m = TaskMetrics(("accuracy", "f1"), 2)
    m.update(_logits_for([1, 1, 0, 0, 1], 2), torch.tensor([1, 0, 0, 1, 1]))
    values = m.compute()
    assert values["accuracy"].item() == pytest.approx(0.6)
    assert values["f1"].item() == pytest.approx(2 / 3)
    assert values["score"].item() == pytest.approx((0.6 + 2 / 3) / 2)


def test_matthews_by_hand():
    # TP 2, TN 1, FP 1, FN 1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    m = TaskMetrics(("matthews_corrcoef",), 2)
    m.update(_logits_for([1, 1, 0, 0, 1], 2), torch.tensor([1, 0, 0, 1, 1]))
    assert m.compute()["matthews_corrcoef"].item() == pytest.approx(1 / 6, abs=1e-6)


def test_pearson_spearman_regression_and_buckets():
    m = TaskMetrics(("pearson", "spearman"), 1)
    m.update(torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 2.0, 3.0]))
    values = m.compute()
    assert values["pearson"].item() == pytest.approx(0.9819805, abs=1e-5)
    assert values["spearman"].item() == pytest.approx(1.0, abs=1e-5)
    bucketed = TaskMetrics(("pearson", "spearman"), 25, stsb_bucket_centers())
    bucketed.update(_logits_for([0, 5, 24], 25), torch.tensor([0, 5, 24]))
    assert bucketed.compute()["score"].item() == pytest.approx(1.0, abs=1e-5)
