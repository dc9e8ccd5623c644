"""Gram estimation (RegMean's statistics): against explicit per-example loops, padding excluded,
shared inputs, 1 vs 2 processes, and the file's checks."""

import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from lightning_merge.backbones import HFTextClassifier, TimmViT
from lightning_merge.cli import main
from lightning_merge.data import GlueDataModule
from lightning_merge.fisher import read_fisher_metadata
from lightning_merge.statistics import GramAccumulator, GramInput, linear_layers
from lightning_merge.tensor_files import SafetensorsFile
from tests.fixtures import TINY_VIT
from tests.processes import run_in_group

ROOT = Path(__file__).resolve().parents[1]
N = 7  # odd: two ranks see 4 and 3 examples


def gram_config(tmp_path, model_dir, glue_dir, output, batch_size=2, dtype="float64"):
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path)},
        "model": {"class_path": "lightning_merge.modules.GramEstimationModule",
                  "init_args": {"backbone": {"class_path": "lightning_merge.backbones.HFTextClassifier",
                                             "init_args": {"name_or_path": str(model_dir)}},
                                "output": str(output), "dtype": dtype}},
        "data": {"class_path": "lightning_merge.data.GlueDataModule",
                 "init_args": {"task": "mnli", "data_dir": str(glue_dir), "batch_size": batch_size,
                               "eval_batch_size": batch_size, "max_predict_examples": N, "seed": 1}},
    }
    path = tmp_path / f"gram_{batch_size}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def reference_grams(model: nn.Module, inputs: list, run) -> dict[str, torch.Tensor]:
    """Σ over examples and tokens (``inputs`` unpadded) of x xᵀ at every Linear's input, one outer product
    at a time in float64, from plain forward hooks; one Gram per layer (no sharing)."""
    grams: dict[str, torch.Tensor] = {}

    def hook(name, module, args):
        x = args[0].detach().double().reshape(-1, args[0].shape[-1])
        for row in x:
            grams[name] = grams.get(name, 0) + torch.outer(row, row)

    handles = [m.register_forward_pre_hook(lambda mod, a, name=n: hook(name, mod, a))
               for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for example in inputs:
            run(example)
    for h in handles:
        h.remove()
    return grams


def read_grams(path) -> tuple[dict, dict[str, torch.Tensor]]:
    header = read_fisher_metadata(path)
    with SafetensorsFile(path) as f:
        return header, {k: f.read_tensor(k) for k in f.keys()}


def test_bert_gram_equals_per_example_loop_and_ignores_padding(tiny_bert3, glue_dir, tmp_path):
    paired, single = tmp_path / "b2.safetensors", tmp_path / "b1.safetensors"
    main(["predict", "--config", gram_config(tmp_path, tiny_bert3, glue_dir, paired, batch_size=2)])
    main(["predict", "--config", gram_config(tmp_path, tiny_bert3, glue_dir, single, batch_size=1)])
    header, grams = read_grams(paired)
    _, unpadded = read_grams(single)
    backbone = HFTextClassifier(str(tiny_bert3)).eval()
    dm = GlueDataModule("mnli", data_dir=str(glue_dir), tokenizer=str(tiny_bert3), max_predict_examples=N, seed=1)
    dm.setup("predict")
    examples = [dm.collate([dm.splits["predict"][i]]) for i in range(N)]
    expected = reference_grams(backbone.model, examples, backbone)
    assert header["kind"] == "gram" and header["num_examples"] == N
    keys = header["gram_keys"]
    head = [n for n in expected if backbone.is_head(f"{n}.weight")]
    assert head and not any(f"{n}.weight" in keys for n in head)  # the task head has no Gram
    for layer in (n for n in expected if n not in head):
        # the models' fp32 activations differ by rounding between padded and unpadded batches; a
        # padded row counted would differ by the size of a row's own square
        stored, scale = grams[keys[f"{layer}.weight"]], float(expected[layer].diagonal().max())
        torch.testing.assert_close(stored, expected[layer], rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(unpadded[keys[f"{layer}.weight"]], stored, rtol=1e-5, atol=1e-6 * scale)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert keys[query] == keys[query.replace("query", "key")] == keys[query.replace("query", "value")]
    assert len(grams) == len(set(keys.values())) < len(keys)  # q, k, v share one Gram
    real_tokens = sum(int(e["attention_mask"].sum()) for e in examples)
    assert header["gram_rows"][keys[query]] == real_tokens


@pytest.mark.parametrize("block", [256, 8], ids=["one-block", "block-rows"])
def test_vit_gram_equals_per_example_loop(block, monkeypatch):
    from lightning_merge.statistics import gram

    monkeypatch.setattr(gram, "BLOCK", block)  # 8: the upper triangle in up to 6 block-rows, then mirrored
    torch.manual_seed(0)
    backbone = TimmViT(num_classes=3, **TINY_VIT).eval()
    images = torch.randn(5, 3, 8, 8)
    layers = linear_layers(backbone.model, backbone.is_head)
    engine = GramAccumulator(layers, torch.float64)
    with torch.no_grad(), engine.capture(None):
        backbone({"pixel_values": images})
    engine.detach()
    # the same batch through plain hooks, then a loop over examples and tokens
    expected = reference_grams(backbone.model, [images], lambda x: backbone({"pixel_values": x}))
    assert set(layers) == {n for n in expected if not backbone.is_head(f"{n}.weight")}
    assert "blocks.0.attn.qkv" in layers  # the fused qkv: one layer, one Gram
    for name in layers:
        torch.testing.assert_close(engine.sums[engine.shared[name]], expected[name], rtol=1e-10, atol=1e-10)


def test_two_processes_equal_one(tiny_bert3, glue_dir, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    main(["predict", "--config", gram_config(tmp_path, tiny_bert3, glue_dir, one)])
    config = gram_config(tmp_path, tiny_bert3, glue_dir, two)
    run = run_in_group([sys.executable, "-m", "lightning_merge.cli", "predict", "--config", config,
                        "--trainer.devices", "2", "--trainer.strategy", "ddp"], cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    h1, single = read_grams(one)
    h2, double = read_grams(two)
    assert h2["num_examples"] == N and h2["gram_rows"] == h1["gram_rows"] and h2["gram_keys"] == h1["gram_keys"]
    for key in single:  # the ranks' batches are padded differently: fp32 activations differ by rounding
        scale = float(single[key].diagonal().max())
        torch.testing.assert_close(double[key], single[key], rtol=1e-5, atol=1e-6 * scale)


def _grams(d_in=4):
    g = torch.randn(9, d_in, dtype=torch.float64)
    return {"w": g.T @ g}


@pytest.mark.parametrize("bad, message", [
    (lambda g: {"w": g["w"][:3, :3]}, "a Gram of another model or layer size"),
    (lambda g: {"w": g["w"].index_put((torch.tensor(0), torch.tensor(1)), torch.tensor(float("nan"),
                                                                                        dtype=torch.float64))},
     "NaN or Inf"),
    (lambda g: {"w": g["w"] + torch.triu(torch.ones_like(g["w"]), 1)}, "not symmetric"),
    (lambda g: {"w": g["w"] - 1e3 * torch.eye(4, dtype=torch.float64)}, "negative diagonal"),
])
def test_bad_grams_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        GramInput(bad(_grams()), {"w": torch.Size([5, 4])}, "model 1 gram")


def test_a_file_that_is_not_a_gram_file_is_refused(tmp_path):
    from lightning_merge.fisher import save_fisher

    save_fisher(tmp_path / "f.safetensors", {"w": torch.ones(5, 4)}, {"num_examples": 1, "variant": "exact"})
    with pytest.raises(ValueError, match="is not a Gram file"):
        GramInput(tmp_path / "f.safetensors", {"w": torch.Size([5, 4])}, "model 0 gram")
