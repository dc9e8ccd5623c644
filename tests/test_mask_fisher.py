"""Mask-node Fisher (paper 003 §3): masks act on the model, eq. 4 matches autograd, expansion rules."""

import pytest
import torch

from lightning_merge.backbones import HFTextClassifier, TimmViT
from lightning_merge.cli import main
from lightning_merge.data import GlueDataModule
from lightning_merge.fisher import load_fisher, logit_directions, read_fisher_metadata, zero_rows
from lightning_merge.fisher.masks import MaskFisherEngine, MaskHooks, expand_mask_fisher
from tests.fixtures import TINY_VIT
from tests.test_fisher_engine import bert_batch, ragged_batch, slice_batch
from tests.test_fisher_module import N, fisher_config


def vit_batch():
    return {"pixel_values": torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
            "labels": torch.zeros(3).long()}


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_masks_change_the_logits_only_when_not_one(tiny_bert3, family):
    torch.manual_seed(0)
    backbone = (HFTextClassifier(str(tiny_bert3)) if family == "bert" else TimmViT(num_classes=3, **TINY_VIT)).eval()
    batch = bert_batch(backbone, 3) if family == "bert" else vit_batch()
    hooks = MaskHooks(backbone.mask_sites())
    assert len(hooks.sites) == 4  # 2 layers × (heads, FFN)
    with torch.no_grad():
        plain = backbone(batch)
        with hooks.installed():
            hooks.ones(3, "cpu", requires_grad=False)
            torch.testing.assert_close(backbone(batch), plain, rtol=0, atol=0)
            for site in hooks.sites:
                hooks.ones(3, "cpu", requires_grad=False)
                hooks.masks[site.name][:, : site.units // 2] = 0
                assert not torch.allclose(backbone(batch), plain, atol=1e-6), site.name
        torch.testing.assert_close(backbone(batch), plain, rtol=0, atol=0)  # hooks removed


def reference_mask_fisher(backbone, batch, n):
    """003 eq. 4 with the exact expectation over labels, one example at a time, explicit mask parameters."""
    hooks = MaskHooks(backbone.mask_sites())
    sums = {s.name: torch.zeros(s.units, dtype=torch.float64) for s in hooks.sites}
    with hooks.installed():
        for i in range(n):
            masks = hooks.ones(1, "cpu")
            log_p = torch.log_softmax(backbone(slice_batch(batch, i))[0].double(), -1)
            for c in range(len(log_p)):
                grads = torch.autograd.grad(log_p[c], list(masks.values()), retain_graph=True)
                for name, g in zip(masks, grads):
                    sums[name] += log_p[c].exp().item() * g[0].double() ** 2
    return {k: v / n for k, v in sums.items()}


def test_mask_fisher_from_predict_equals_autograd_on_explicit_masks(tiny_bert3, glue_dir, tmp_path):
    output = tmp_path / "mask.safetensors"
    main(["predict", "--config", fisher_config(tmp_path, tiny_bert3, glue_dir, output),
          "--model.init_args.kind", "mask"])
    meta = read_fisher_metadata(output)
    assert meta["kind"] == "mask" and meta["num_examples"] == N and len(meta["mask_layout"]) == 4
    backbone = HFTextClassifier(str(tiny_bert3)).eval()
    dm = GlueDataModule("mnli", data_dir=str(glue_dir), tokenizer=str(tiny_bert3), max_predict_examples=N, seed=1)
    dm.setup("predict")
    per_example = [reference_mask_fisher(backbone, dm.collate([dm.splits["predict"][i]]), 1) for i in range(N)]
    reference = {k: sum(one[k] for one in per_example) / N for k in per_example[0]}
    fast = load_fisher(output)
    for name, ref in reference.items():
        torch.testing.assert_close(fast[name].double(), ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("skip_rows_below", [0.0, 2.0])
def test_mask_fisher_engine_with_and_without_skipping_zero_rows(tiny_bert3, monkeypatch, skip_rows_below):
    """Input gradients computed on non-zero rows only (padding, [CLS] in the last layer) or on all."""
    monkeypatch.setattr(zero_rows, "SKIP_ROWS_BELOW", skip_rows_below)
    backbone = HFTextClassifier(str(tiny_bert3)).eval().double()
    batch = ragged_batch(backbone)
    engine = MaskFisherEngine(backbone.model, backbone.mask_sites())
    routed = [m for m in backbone.model.modules() if "forward" in vars(m)]
    assert len(routed) == 2 * 6 + 2  # every linear layer: 2 blocks × 6, pooler, classifier
    with engine.capture(4):
        logits = backbone(batch)
        engine.accumulate(logits, logit_directions(logits, "exact"))
    engine.detach()
    assert not any("forward" in vars(m) for m in backbone.model.modules())
    reference = reference_mask_fisher(backbone, batch, 4)
    for name, ref in reference.items():
        torch.testing.assert_close(engine.sums[name].double() / 4, ref, rtol=1e-6, atol=1e-14)


def test_expansion_rules_by_hand(tiny_bert3):
    backbone = HFTextClassifier(str(tiny_bert3))
    layout = {s.name: s.layout() for s in backbone.mask_sites()}
    shapes = {n: p.shape for n, p in backbone.body_named_parameters()}
    fisher = {name: torch.arange(1.0, site["units"] + 1) for name, site in layout.items()}
    paper = expand_mask_fisher(fisher, layout, shapes, "paper")
    base = "bert.encoder.layer.0"
    # 4 heads of 8 dims: rows 8..15 of Q and K belong to head 2 (Fisher 2.0).
    for proj in ("query", "key"):
        assert paper[f"{base}.attention.self.{proj}.weight"][8:16].unique().tolist() == [2.0]
        assert paper[f"{base}.attention.self.{proj}.bias"][24:32].unique().tolist() == [4.0]
    assert paper[f"{base}.attention.self.value.weight"].unique().tolist() == [1.0]
    torch.testing.assert_close(paper[f"{base}.intermediate.dense.weight"][:, 0], torch.arange(1.0, 38))
    torch.testing.assert_close(paper[f"{base}.intermediate.dense.bias"], torch.arange(1.0, 38))
    assert paper["bert.embeddings.word_embeddings.weight"].unique().tolist() == [1.0]
    released = expand_mask_fisher(fisher, layout, shapes, "released")
    assert released[f"{base}.attention.self.value.weight"].unique().tolist() == [2.5]  # mean of 1..4
    assert released[f"{base}.attention.output.dense.weight"].unique().tolist() == [2.5]
    assert released[f"{base}.output.dense.weight"].unique().tolist() == [19.0]  # mean of 1..37
    global_mean = torch.cat([f for f in fisher.values()]).mean().item()
    assert released["bert.embeddings.word_embeddings.weight"].unique().item() == pytest.approx(global_mean)
    query = f"{base}.attention.self.query.weight"
    torch.testing.assert_close(released[query], paper[query])


def test_vit_fused_qkv_rows(tmp_path):
    backbone = TimmViT(num_classes=3, **TINY_VIT)
    layout = {s.name: s.layout() for s in backbone.mask_sites()}
    shapes = {n: p.shape for n, p in backbone.body_named_parameters()}
    fisher = {name: torch.arange(1.0, site["units"] + 1) for name, site in layout.items()}
    w = expand_mask_fisher(fisher, layout, shapes, "paper")["blocks.1.attn.qkv.weight"]  # (96, 32): q, k, v
    assert w[0:8].unique().tolist() == [1.0] and w[32 + 24:32 + 32].unique().tolist() == [4.0]
    assert w[64:].unique().tolist() == [1.0]  # V keeps 1 under the paper's rule


def test_missing_mask_entry_is_named(tiny_bert3):
    backbone = HFTextClassifier(str(tiny_bert3))
    layout = {s.name: s.layout() for s in backbone.mask_sites()}
    with pytest.raises(KeyError, match="no entry for sites"):
        expand_mask_fisher({}, layout, {}, "paper")
