import torch

from lightning_merge.backbones import HFTextClassifier
from lightning_merge.modules import FineTuneModule
from lightning_merge.regularization import l2_to_reference


def test_l2_gradient_is_two_lambda_delta_on_body_and_zero_on_head(tiny_bert):
    lam = 0.37
    module = FineTuneModule(HFTextClassifier(str(tiny_bert)), l2_to_pretrained=lam)
    body = dict(module.backbone.body_named_parameters())
    head = set(module.backbone.head_parameter_names())
    assert head == {"classifier.weight", "classifier.bias"}
    start = {n: p.detach().clone() for n, p in module.backbone.model.named_parameters()}
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    loss = lam * l2_to_reference(module._body, module._reference)
    loss.backward()
    for name, p in module.backbone.model.named_parameters():
        if name in head:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, 2 * lam * (p.detach() - start[name]))
    assert len(body) + len(head) == len(start)


def test_no_reference_copy_when_off(tiny_bert):
    assert FineTuneModule(HFTextClassifier(str(tiny_bert)))._reference == []
