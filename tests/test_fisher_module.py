"""Fisher estimation through `lightning-merge predict`, against the per-example loop; 1 vs 2 processes."""

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_merge.backbones import HFTextClassifier
from lightning_merge.cli import main
from lightning_merge.data import GlueDataModule
from lightning_merge.fisher import load_fisher, read_fisher_metadata, save_fisher
from tests.processes import run_in_group
from tests.reference_fisher import reference_fisher_sums
from tests.test_fisher_engine import assert_matches

ROOT = Path(__file__).resolve().parents[1]
N = 7  # odd: two ranks see 4 and 3 examples


def fisher_config(tmp_path, model_dir, glue_dir, output, variant="exact"):
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "inference_mode": False, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "lightning_merge.modules.FisherEstimationModule",
                  "init_args": {"backbone": {"class_path": "lightning_merge.backbones.HFTextClassifier",
                                             "init_args": {"name_or_path": str(model_dir)}},
                                "output": str(output), "variant": variant}},
        "data": {"class_path": "lightning_merge.data.GlueDataModule",
                 "init_args": {"task": "mnli", "data_dir": str(glue_dir), "batch_size": 2,
                               "max_predict_examples": N, "seed": 1}},
    }
    path = tmp_path / f"fisher_{variant}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def reference_for(model_dir, glue_dir, variant="exact"):
    backbone = HFTextClassifier(str(model_dir)).eval()
    dm = GlueDataModule("mnli", data_dir=str(glue_dir), tokenizer=str(model_dir), max_predict_examples=N, seed=1)
    dm.setup("predict")
    examples = [dm.collate([dm.splits["predict"][i]]) for i in range(N)]
    labels = torch.tensor([int(e["labels"][0]) for e in examples])
    sums = reference_fisher_sums(backbone.model, lambda i: backbone(examples[i]), N, variant, labels)
    return {k: v / N for k, v in sums.items()}


@pytest.mark.parametrize("variant", ["exact", "empirical"])
def test_predict_writes_the_fisher_of_eq2(tiny_bert3, glue_dir, tmp_path, variant):
    output = tmp_path / "f.safetensors"
    main(["predict", "--config", fisher_config(tmp_path, tiny_bert3, glue_dir, output, variant)])
    meta = read_fisher_metadata(output)
    assert meta["num_examples"] == N and meta["variant"] == variant and meta["num_labels"] == 3
    assert_matches(load_fisher(output), reference_for(tiny_bert3, glue_dir, variant), rtol=1e-5)


def test_auto_weighs_the_cost_of_the_exact_expectation(tiny_bert3):
    from lightning_merge.modules import FisherEstimationModule

    backbone = HFTextClassifier(str(tiny_bert3))
    chosen = FisherEstimationModule(backbone, "f.safetensors")
    assert chosen.variant == "exact" and chosen.variant_reason == "auto: 3 labels <= max_exact_classes 16"
    chosen = FisherEstimationModule(backbone, "f.safetensors", max_exact_classes=2, num_samples=2)
    assert chosen.variant == "sampled" and "3 labels > max_exact_classes 2" in chosen.variant_reason
    assert FisherEstimationModule(backbone, "f.safetensors", "exact", max_exact_classes=2).variant == "exact"


def test_inference_mode_is_refused(tiny_bert3, glue_dir, tmp_path):
    config = fisher_config(tmp_path, tiny_bert3, glue_dir, tmp_path / "f.safetensors")
    with pytest.raises(RuntimeError, match="inference_mode"):
        main(["predict", "--config", config, "--trainer.inference_mode", "true"])
    assert not (tmp_path / "f.safetensors").exists()


def test_two_processes_equal_one(tiny_bert3, glue_dir, tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    main(["predict", "--config", fisher_config(tmp_path, tiny_bert3, glue_dir, one)])
    config = fisher_config(tmp_path, tiny_bert3, glue_dir, two)
    run = run_in_group([sys.executable, "-m", "lightning_merge.cli", "predict", "--config", config,
                        "--trainer.devices", "2", "--trainer.strategy", "ddp"], cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert read_fisher_metadata(two)["num_examples"] == N
    single, double = load_fisher(one), load_fisher(two)
    for name in single:
        torch.testing.assert_close(double[name], single[name], rtol=1e-5, atol=1e-12)


def test_label_count_mismatch(tiny_bert, glue_dir, tmp_path):
    config = fisher_config(tmp_path, tiny_bert, glue_dir, tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="head has 2 outputs but the data has 3 labels"):
        main(["predict", "--config", config])


def test_corrupt_and_truncated_files_are_named(tmp_path):
    meta = {"num_examples": 3, "variant": "exact"}
    good = save_fisher(tmp_path / "good.safetensors", {"w": torch.ones(64, 64)}, meta)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    for name in ("trunc", "junk"):
        with pytest.raises(ValueError, match="corrupt or truncated"):
            load_fisher(tmp_path / f"{name}.safetensors")
    with pytest.raises(KeyError, match="has no Fisher for \\['v'\\]"):
        load_fisher(good, ["w", "v"])


def test_nan_fisher_is_not_written_and_old_file_survives(tmp_path):
    path = save_fisher(tmp_path / "f.safetensors", {"w": torch.ones(2)}, {"num_examples": 1, "variant": "exact"})
    with pytest.raises(ValueError, match="'w' has NaN"):
        save_fisher(path, {"w": torch.tensor([1.0, float("nan")])}, {"num_examples": 1, "variant": "exact"})
    torch.testing.assert_close(load_fisher(path)["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["f.safetensors"]


def test_fisher_preset_composes_with_a_data_config(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--config", str(ROOT / "configs/data/glue.yaml"),
              "--config", str(ROOT / "configs/fisher/exact.yaml"), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["inference_mode"] is False
    assert printed["data"]["init_args"]["max_predict_examples"] == 4096
    assert printed["model"]["class_path"] == "lightning_merge.modules.FisherEstimationModule"


def test_masked_lm_fisher_and_its_merge_with_a_classifier(tiny_bert, glue_dir, tmp_path):
    """NeurIPS §3.4: the Fisher of a masked-LM checkpoint (sampled tokens at masked positions), then a
    Fisher merge of that domain-adapted body into a classifier fine-tuned from the same start."""
    from lightning_merge.backbones import HFMaskedLM, load_backbone
    from tests.fixtures import SENTENCES

    mlm = HFMaskedLM(str(tiny_bert)).export(tmp_path / "mlm")
    text = tmp_path / "domain.txt"
    text.write_text("\n".join(SENTENCES * 3) + "\n")
    common = ["--trainer.inference_mode=false", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}",
              "--model=lightning_merge.modules.FisherEstimationModule"]
    main(["predict", *common, "--model.backbone=lightning_merge.backbones.HFMaskedLM",
          f"--model.backbone.name_or_path={mlm}", f"--model.output={tmp_path / 'mlm.safetensors'}",
          "--model.num_samples=2", "--data=lightning_merge.data.MaskedTextDataModule", f"--data.source={text}",
          "--data.batch_size=4"])
    meta = read_fisher_metadata(tmp_path / "mlm.safetensors")
    assert meta["variant"] == "sampled" and meta["samples_per_example"] == 2  # auto: a vocabulary-sized output
    assert meta["variant_reason"] == "auto: several outputs per example (masked positions)"
    assert meta["num_examples"] == 3 * len(SENTENCES)
    fisher = load_fisher(tmp_path / "mlm.safetensors")
    assert fisher["bert.embeddings.word_embeddings.weight"].sum() > 0  # tied with the decoder
    assert "cls.predictions.transform.dense.weight" in fisher and "bert.pooler.dense.weight" not in fisher
    main(["predict", *common, "--model.backbone=lightning_merge.backbones.HFTextClassifier",
          f"--model.backbone.name_or_path={tiny_bert}", f"--model.output={tmp_path / 'cls.safetensors'}",
          "--data=lightning_merge.data.GlueDataModule", "--data.task=rte", f"--data.data_dir={glue_dir}"])
    config = {"trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                          "default_root_dir": str(tmp_path)},
              "model": {"class_path": "lightning_merge.modules.MergeModule", "init_args": {
                  "models": [{"path": str(tiny_bert), "fisher": str(tmp_path / "cls.safetensors"),
                              "data": {"class_path": "lightning_merge.data.GlueDataModule",
                                       "init_args": {"task": "rte", "data_dir": str(glue_dir)}}},
                             {"path": str(mlm), "fisher": str(tmp_path / "mlm.safetensors"), "allow_missing": True}],
                  "methods": [{"class_path": "lightning_merge.merging.FisherMerge"}],
                  "select_examples": 0.5, "output_dir": str(tmp_path / "out"),
                  "export_dir": str(tmp_path / "merged")}}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    main(["validate", "--config", str(tmp_path / "merge.yaml")])
    merged = load_backbone(tmp_path / "merged").model.state_dict()
    target = load_backbone(tiny_bert).model.state_dict()
    donor = load_backbone(mlm).model.state_dict()
    assert torch.equal(merged["bert.pooler.dense.weight"], target["bert.pooler.dense.weight"])  # MLM has none
    name = "bert.encoder.layer.0.output.dense.weight"
    f_t, f_d = load_fisher(tmp_path / "cls.safetensors")[name], fisher[name]
    torch.testing.assert_close(merged[name], (f_t * target[name] + f_d * donor[name]) / (f_t + f_d))
