"""The GPT-2 family: last-real-token classifiers whose linear layers are ``Conv1D`` (weight ``in × out``).
Fisher (full, sampled, mask-node) against the batch-1 loop, export/reload, Grams and RegMean in that
layout, and a merge through ``MergeModule``."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_merge.backbones import HFGPT2Classifier, load_backbone, read_manifest
from lightning_merge.cli import main
from lightning_merge.fisher import logit_directions
from lightning_merge.fisher.masks import MaskFisherEngine, expand_mask_fisher
from lightning_merge.merging import FlatMerger, RegMeanMerge
from lightning_merge.statistics import GramInput
from tests.fixtures import SENTENCES, write_tiny_gpt2
from tests.test_fisher_engine import assert_matches, engine_and_loop
from tests.test_mask_fisher import reference_mask_fisher

GLUE = "lightning_merge.data.GlueDataModule"
GPT2 = "lightning_merge.backbones.HFGPT2Classifier"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return write_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), num_labels=3, seed=5)


def gpt2_batch(backbone, n=5):
    """Pairs of different lengths: right padding after each example's last real token."""
    texts = [SENTENCES[i % len(SENTENCES)] + " the" * i for i in range(n)]
    batch = dict(backbone.tokenizer(texts, [SENTENCES[(i + 3) % 8] for i in range(n)], padding=True,
                                    return_tensors="pt"))
    batch["labels"] = torch.arange(n) % backbone.num_labels
    return batch


def test_last_real_token_pooling_ignores_padding(gpt2_dir):
    backbone = HFGPT2Classifier(str(gpt2_dir)).eval()
    batch = gpt2_batch(backbone)
    assert backbone.tokenizer.pad_token == "<|endoftext|>" and backbone.head_prefixes == ("score.",)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # really padded
    with torch.no_grad():
        together = backbone(batch)
        alone = torch.cat([backbone({k: v[i:i + 1, :int(batch["attention_mask"][i].sum())]
                                     for k, v in batch.items() if k != "labels"}) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["exact", "sampled"])
def test_full_fisher_matches_the_batch1_loop_in_fp32(gpt2_dir, variant):
    backbone = HFGPT2Classifier(str(gpt2_dir)).eval()
    fast, slow = engine_and_loop(backbone, gpt2_batch(backbone), variant)
    assert fast["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # in × out, as stored
    assert_matches(fast, slow, rtol=1e-5)


def test_mask_fisher_matches_explicit_masks_and_expands_to_columns(gpt2_dir):
    backbone = HFGPT2Classifier(str(gpt2_dir)).eval()
    batch = gpt2_batch(backbone, 4)
    sites = backbone.mask_sites()
    assert [s.units for s in sites] == [4, 37, 4, 37]
    engine = MaskFisherEngine(backbone.model, sites)
    with engine.capture(4):
        logits = backbone(batch)
        engine.accumulate(logits, logit_directions(logits, "exact"))
    engine.detach()
    reference = reference_mask_fisher(backbone, batch, 4)
    for name, ref in reference.items():
        torch.testing.assert_close(engine.sums[name].double() / 4, ref, rtol=1e-5, atol=1e-12)
    # head h of 8 dims: columns 8h..8h+7 of query and of key (a block of 32 columns each) in c_attn
    layout = {s.name: s.layout() for s in sites}
    shapes = {n: p.shape for n, p in backbone.body_named_parameters()}
    fisher = {name: torch.arange(1.0, site["units"] + 1) for name, site in layout.items()}
    weights = expand_mask_fisher(fisher, layout, shapes, "paper")
    c_attn = weights["transformer.h.1.attn.c_attn.weight"]  # (32 in, 96 out)
    assert c_attn[:, 16:24].unique().tolist() == [3.0] and c_attn[:, 32 + 24:32 + 32].unique().tolist() == [4.0]
    assert c_attn[:, 64:].unique().tolist() == [1.0]  # value keeps 1 under the paper's rule
    torch.testing.assert_close(weights["transformer.h.0.mlp.c_fc.weight"][3], torch.arange(1.0, 38))
    torch.testing.assert_close(weights["transformer.h.0.mlp.c_fc.bias"], torch.arange(1.0, 38))


def test_export_reloads_the_same_logits_and_a_plain_folder_is_recognised(gpt2_dir, tmp_path):
    backbone = HFGPT2Classifier(str(gpt2_dir)).eval()
    batch = gpt2_batch(backbone)
    backbone.export(tmp_path / "export")
    assert read_manifest(tmp_path / "export")["family"] == "hf_gpt2"
    for source in (tmp_path / "export", gpt2_dir):  # an export, and a plain save_pretrained folder (no manifest)
        reloaded = load_backbone(source).eval()
        assert isinstance(reloaded, HFGPT2Classifier)
        with torch.no_grad():
            torch.testing.assert_close(reloaded(batch), backbone(batch), rtol=0, atol=0)


def _reference_grams(backbone, batch):
    """Σ x xᵀ at every Conv1D's input over real tokens, one outer product at a time in float64."""
    grams = {}

    def hook(name, module, args):
        for b, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            for row in args[0][b, :length].double():
                grams[name] = grams.get(name, 0) + torch.outer(row, row)

    handles = [m.register_forward_pre_hook(lambda mod, a, name=n: hook(name, mod, a))
               for n, m in backbone.model.named_modules() if isinstance(m, Conv1D)]
    with torch.no_grad():
        backbone(batch)
    for handle in handles:
        handle.remove()
    return grams


def _gram_config(path, model_dir, glue_dir, output):
    path.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(path.parent)},
        "model": {"class_path": "lightning_merge.modules.GramEstimationModule",
                  "init_args": {"backbone": {"class_path": GPT2, "init_args": {"name_or_path": str(model_dir)}},
                                "output": str(output), "dtype": "float64"}},
        "data": {"class_path": GLUE, "init_args": {"task": "mnli", "data_dir": str(glue_dir), "batch_size": 3,
                                                    "max_predict_examples": 6, "seed": 1}}}))
    return str(path)


def test_grams_of_conv1d_inputs_and_regmean_in_the_in_out_layout(gpt2_dir, glue_dir, tmp_path):
    models = [gpt2_dir, write_tiny_gpt2(tmp_path / "other", num_labels=3, seed=6)]
    files = [tmp_path / f"g{i}.safetensors" for i in range(2)]
    for i, (model, output) in enumerate(zip(models, files)):
        main(["predict", "--config", _gram_config(tmp_path / f"gram{i}.yaml", model, glue_dir, output)])
    header = GramInput(files[0], {}, "g0").metadata
    fc = "transformer.h.0.mlp.c_fc.weight"
    assert fc in header["transposed_weights"] and "score.weight" not in header["gram_keys"]
    # against the loop, on the same six examples
    backbone = HFGPT2Classifier(str(gpt2_dir)).eval()
    from lightning_merge.data import GlueDataModule

    dm = GlueDataModule("mnli", data_dir=str(glue_dir), batch_size=6, max_predict_examples=6, seed=1)
    dm.attach_model(backbone)
    dm.setup("predict")
    batch = next(iter(dm.predict_dataloader()))
    expected = _reference_grams(backbone, batch)
    stored = load_file(files[0])
    for layer, gram in expected.items():
        torch.testing.assert_close(stored[header["gram_keys"][f"{layer}.weight"]], gram, rtol=1e-6, atol=1e-8)
    # RegMean on c_fc (W: in × out, as the paper writes it): W* = (Σ G̃_i)⁻¹ Σ G̃_i W_i, no transpose
    states = [{n: p.detach() for n, p in HFGPT2Classifier(str(m)).model.named_parameters()} for m in models]
    body = [n for n in states[0] if not n.startswith("score.")]
    shapes = {n: states[0][n].shape for n in body}
    merged = FlatMerger.from_states(RegMeanMerge(alpha=0.7), states, shapes, {"gram": [str(f) for f in files]},
                                    chunk=1000)([0.5, 0.5])  # pieces smaller than c_fc: it must stay whole
    grams = [load_file(f)[header["gram_keys"][fc]].double() for f in files]
    tilde = [0.7 * g + 0.3 * torch.diag(g.diagonal()) for g in grams]
    closed = torch.linalg.solve(sum(tilde), sum(t @ s[fc].double() for t, s in zip(tilde, states)))
    torch.testing.assert_close(merged[fc].double(), closed, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(merged[fc], (states[0][fc] + states[1][fc]) / 2, atol=1e-4)
    # the shared check names a Gram that does not fit the in × out weight
    with pytest.raises(ValueError, match="Gram for 'transformer.h.0.mlp.c_fc.weight'"):
        FlatMerger.from_states(RegMeanMerge(), [{**st, fc: st[fc].T.contiguous()} for st in states],
                               {**shapes, fc: shapes[fc][::-1]}, {"gram": [str(f) for f in files]})


def test_merge_module_merges_two_gpt2_models(gpt2_dir, glue_dir, tmp_path):
    models = [gpt2_dir, write_tiny_gpt2(tmp_path / "other", num_labels=3, seed=6)]
    fishers = [tmp_path / f"f{i}.safetensors" for i in range(2)]
    for model, output in zip(models, fishers):
        main(["predict", "--trainer.inference_mode=false", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
              "--model=lightning_merge.modules.FisherEstimationModule", f"--model.backbone={GPT2}",
              f"--model.backbone.name_or_path={model}", f"--model.output={output}", f"--data={GLUE}",
              "--data.task=mnli", f"--data.data_dir={glue_dir}", "--data.max_predict_examples=6"])
    config = {"trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                          "default_root_dir": str(tmp_path)},
              "model": {"class_path": "lightning_merge.modules.MergeModule", "init_args": {
                  "models": [{"path": str(m), "fisher": str(f), "task": "mnli",
                              "data": {"class_path": GLUE, "init_args": {"task": "mnli", "data_dir": str(glue_dir)}}}
                             for m, f in zip(models, fishers)],
                  "methods": [{"class_path": "lightning_merge.merging.FisherMerge"}],
                  "output_dir": str(tmp_path / "out"), "export_dir": str(tmp_path / "merged")}}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    main(["validate", "--config", str(tmp_path / "merge.yaml")])
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["results"]}
    assert {"unmerged", "ensemble", "fisher"} <= set(rows)
    exported = load_backbone(tmp_path / "merged" / "mnli_0")
    assert isinstance(exported, HFGPT2Classifier)
    states = [dict(HFGPT2Classifier(str(m)).model.named_parameters()) for m in models]
    fisher = [load_file(f) for f in fishers]
    name = "transformer.h.1.mlp.c_proj.weight"  # eq. 4 with λ = ½ each, element by element
    f0, f1 = fisher[0][name], fisher[1][name]
    expected = (f0 * states[0][name] + f1 * states[1][name]) / (f0 + f1)
    torch.testing.assert_close(dict(exported.model.named_parameters())[name].detach(), expected.detach(),
                               rtol=1e-5, atol=1e-7)
    assert isinstance(dict(exported.model.named_modules())["transformer.h.1.mlp.c_proj"], nn.Module)
