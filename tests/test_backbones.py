import pytest
import torch

from lightning_merge.backbones import HFTextClassifier, TimmViT, load_backbone
from tests.fixtures import TINY_VIT


def test_hf_export_reload_gives_identical_logits(tiny_bert, tmp_path):
    backbone = HFTextClassifier(str(tiny_bert)).eval()
    batch = dict(backbone.tokenizer(["the cat sat", "a dog runs in the park"], padding=True, return_tensors="pt"))
    out = backbone.export(tmp_path / "export")
    reloaded = load_backbone(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), backbone(batch), rtol=0, atol=0)
    assert reloaded.tokenizer("the cat sat")["input_ids"] == backbone.tokenizer("the cat sat")["input_ids"]


def test_timm_export_reload_gives_identical_logits(tmp_path):
    backbone = TimmViT(num_classes=10, **TINY_VIT).eval()
    assert backbone.head_parameter_names() == ["head.weight", "head.bias"]
    pixels = {"pixel_values": torch.randn(3, 3, 8, 8)}
    reloaded = load_backbone(backbone.export(tmp_path / "vit")).eval()
    assert reloaded.num_labels == 10 and reloaded.img_size == 8
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels), backbone(pixels), rtol=0, atol=0)


def test_export_replaces_atomically(tmp_path):
    backbone = TimmViT(num_classes=4, **TINY_VIT)
    target = tmp_path / "vit"
    backbone.export(target)
    backbone.export(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit"]


def test_head_size_mismatch_is_named(tiny_bert3, tmp_path):
    with pytest.raises(ValueError, match="classification head has a different size than num_labels=2"):
        HFTextClassifier(str(tiny_bert3), num_labels=2)
    assert HFTextClassifier(str(tiny_bert3), num_labels=2, reinit_head=True).num_labels == 2
    vit = TimmViT(num_classes=10, **TINY_VIT).export(tmp_path / "vit10")
    with pytest.raises(ValueError, match=r"head \(10 classes\) differs from num_classes=3"):
        TimmViT(checkpoint=str(vit), num_classes=3)


def test_patch_size_must_divide_image_size():
    with pytest.raises(ValueError, match="img_size=9 is not divisible by patch_size=2"):
        TimmViT(model_name="vit_tiny_patch16_224", img_size=9, patch_size=2)
