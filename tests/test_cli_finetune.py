"""End-to-end fine-tuning through the real `lightning-merge` entry point, offline."""

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import timm
import timm.data
import torch
import yaml

from lightning_merge.backbones import load_backbone
from lightning_merge.cli import main
from tests.processes import run_in_group

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs/trainer/cpu_smoke.yaml")


def _write(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_fit_tiny_bert_on_local_glue_exports_a_reloadable_model(tiny_bert3, glue_dir, tmp_path):
    config = _write(tmp_path / "bert.yaml", {
        "model": {"class_path": "lightning_merge.modules.FineTuneModule",
                  "init_args": {"backbone": {"class_path": "lightning_merge.backbones.HFTextClassifier",
                                             "init_args": {"name_or_path": str(tiny_bert3), "num_labels": 3}},
                                "learning_rate": 1e-3, "l2_to_pretrained": 3e-4,
                                "export_dir": str(tmp_path / "export")}},
        "data": {"class_path": "lightning_merge.data.GlueDataModule",
                 "init_args": {"task": "mnli", "data_dir": str(glue_dir), "batch_size": 4}},
        "trainer": {"default_root_dir": str(tmp_path / "run")},
    })
    cli = main(["fit", "--config", SMOKE, "--config", config])
    assert cli.trainer.global_step == 4
    assert "val/score" in cli.trainer.callback_metrics
    assert "val/mnli/accuracy" in cli.trainer.callback_metrics
    trained = cli.model.backbone.eval()
    reloaded = load_backbone(tmp_path / "export").eval()
    batch = next(iter(cli.datamodule.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(batch), trained(batch), rtol=0, atol=0)
    # Training moved the weights away from the tiny BERT it started from.
    assert not torch.equal(reloaded.model.classifier.weight, load_backbone(tiny_bert3).model.classifier.weight)
    # Clients see the task's label names, not LABEL_0..2.
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["id2label"] == {"0": "entailment", "1": "neutral", "2": "contradiction"}
    assert exported["label2id"]["neutral"] == 1
    assert reloaded.label_names == ["entailment", "neutral", "contradiction"]
    # Same seed, same model: length-grouped batches and dropout follow the seed (a second run, two epochs).
    again = [main(["fit", "--config", SMOKE, "--config", config, "--seed_everything=3", "--trainer.max_epochs=2",
                   f"--model.init_args.export_dir={tmp_path / run}"]).model.backbone.model.state_dict()
             for run in ("seed3a", "seed3b")]
    assert all(torch.equal(again[0][k], again[1][k]) for k in again[0])
    assert not torch.equal(again[0]["classifier.weight"], reloaded.model.classifier.weight)


def test_fit_tiny_vit_on_digits_with_ood_sets(tmp_path, capsys):
    cli = main(["fit", "--config", SMOKE, "--config", str(ROOT / "configs/data/digits.yaml"),
                "--config", str(ROOT / "configs/model/vit_tiny_digits.yaml"),
                "--model.init_args.backbone.init_args.model_kwargs", "{embed_dim: 32, depth: 2, num_heads: 4}",
                "--data.init_args.eval_shifts", "[rotate, invert]",
                "--model.init_args.export_dir", str(tmp_path / "export"),
                "--trainer.default_root_dir", str(tmp_path / "run")])
    metrics = cli.trainer.callback_metrics
    assert {"val/iid/accuracy", "val/rotate/accuracy", "val/invert/accuracy"} <= set(metrics)
    last = capsys.readouterr().out.strip().splitlines()[-1]  # the stage's last line: what was written where
    assert last.startswith("lightning-merge fit: exported the fine-tuned timm_vit model to ") and "export" in last
    reloaded = load_backbone(tmp_path / "export")
    assert reloaded.num_labels == 10 and reloaded.label_names == [str(i) for i in range(10)]
    # timm's own reading of the export: its preprocessing is the data module's.
    expected = {"input_size": (3, 8, 8), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                "crop_pct": 1.0}
    for model in (reloaded.model, timm.create_model(f"local-dir:{tmp_path / 'export'}")):
        config = timm.data.resolve_data_config(model=model)
        assert {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in expected} == expected


def test_label_count_mismatch_is_named(tiny_bert, glue_dir, tmp_path):
    with pytest.raises(ValueError, match="head has 2 outputs but the data has 3 labels"):
        main(["fit", "--config", SMOKE,
              "--model", "lightning_merge.modules.FineTuneModule",
              "--model.backbone", "lightning_merge.backbones.HFTextClassifier",
              "--model.backbone.name_or_path", str(tiny_bert),
              "--data", "lightning_merge.data.GlueDataModule", "--data.task", "mnli",
              "--data.data_dir", str(glue_dir), "--trainer.default_root_dir", str(tmp_path)])


def test_a_fresh_head_is_sized_from_the_data(tiny_bert, glue_dir, tmp_path):
    """No num_labels anywhere: a new head (reinit_head, or a checkpoint without one) takes the data's label
    count when fitting starts, and the L2 term and optimizer see the reloaded body."""
    cli = main(["fit", "--config", SMOKE,
                "--model", "lightning_merge.modules.FineTuneModule", "--model.l2_to_pretrained", "0.01",
                "--model.backbone", "lightning_merge.backbones.HFTextClassifier",
                "--model.backbone.name_or_path", str(tiny_bert), "--model.backbone.reinit_head", "true",
                "--model.export_dir", str(tmp_path / "export"),
                "--data", "lightning_merge.data.GlueDataModule", "--data.task", "mnli",
                "--data.data_dir", str(glue_dir), "--trainer.default_root_dir", str(tmp_path)])
    assert cli.model.backbone.num_labels == 3 and cli.trainer.global_step == 2  # 24 examples, batches of 16
    body = dict(cli.model.backbone.body_named_parameters())
    assert cli.model._body[0] is next(iter(body.values()))  # the reloaded body, not the first load's
    assert load_backbone(tmp_path / "export").num_labels == 3
    assert load_backbone(tmp_path / "export").label_names == ["entailment", "neutral", "contradiction"]


def test_print_config_is_complete_and_reusable(tmp_path):
    args = ["fit", "--config", str(ROOT / "configs/data/digits.yaml"),
            "--config", str(ROOT / "configs/model/vit_tiny_digits.yaml")]
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main([*args, "--print_config"])
    printed = yaml.safe_load(out.getvalue())
    assert printed["model"]["init_args"]["backbone"]["init_args"]["patch_size"] == 2
    assert printed["data"]["init_args"]["source"] == "digits"
    saved = tmp_path / "printed.yaml"
    saved.write_text(out.getvalue())
    again = io.StringIO()
    with redirect_stdout(again), pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(again.getvalue()) == printed


DIGITS_VIT = ["configs/data/digits.yaml", "configs/model/vit_tiny_digits.yaml"]
GLUE_MINILM = ["configs/data/glue.yaml", "configs/model/minilm.yaml"]
# Every YAML in configs/ and recipes/, composed as its header says, through the real entry point.
COMPOSITIONS = {
    "trainer/default": ("fit", [*GLUE_MINILM, "configs/trainer/default.yaml"]),
    "trainer/cpu_smoke": ("fit", [*DIGITS_VIT, "configs/trainer/cpu_smoke.yaml"]),
    "model/bert_base": ("fit", ["configs/data/glue.yaml", "configs/model/bert_base.yaml"]),
    "fisher/exact": ("predict", ["configs/data/glue.yaml", "configs/fisher/exact.yaml"]),
    "fisher/exact+images": ("predict", ["configs/data/digits.yaml", "configs/fisher/exact.yaml"]),
    "merge/streamed_fisher": ("merge", ["configs/merge/streamed_fisher.yaml"]),
    "gram/glue": ("predict", ["configs/data/glue.yaml", "configs/gram/glue.yaml"]),
    "multitask_digits/gram": ("predict", ["configs/data/digits.yaml", "recipes/multitask_digits/gram.yaml"]),
    "multitask_digits/finetune": ("fit", ["configs/data/digits.yaml", "configs/model/vit_tiny_digits.yaml",
                                          "recipes/multitask_digits/finetune.yaml"]),
    "multitask_digits/merge": ("validate", ["recipes/multitask_digits/merge.yaml"]),
    "quickstart/pretrain": ("fit", [*DIGITS_VIT, "recipes/quickstart/pretrain.yaml"]),
    "quickstart/finetune_shifted": ("fit", [*DIGITS_VIT, "recipes/quickstart/finetune_shifted.yaml"]),
    "quickstart/finetune_noise": ("fit", [*DIGITS_VIT, "recipes/quickstart/finetune_noise.yaml"]),
    "quickstart/fisher": ("predict", ["configs/data/digits.yaml", "recipes/quickstart/fisher.yaml"]),
    "quickstart/wise_ft": ("validate", ["recipes/quickstart/wise_ft.yaml"]),
    "quickstart/merge": ("validate", ["recipes/quickstart/merge.yaml"]),
    "glue_intermediate_minilm/finetune": ("fit", [*GLUE_MINILM, "recipes/glue_intermediate_minilm/finetune.yaml"]),
    "glue_intermediate_minilm/merge": ("validate", ["recipes/glue_intermediate_minilm/merge.yaml"]),
    "glue_intermediate/finetune": ("fit", ["configs/trainer/default.yaml", "configs/model/bert_base.yaml",
                                           "configs/data/glue.yaml", "recipes/glue_intermediate/finetune.yaml"]),
    "glue_intermediate/merge": ("validate", ["recipes/glue_intermediate/merge.yaml"]),
    "glue_intermediate/donor_finetuned": ("validate", ["recipes/glue_intermediate/merge.yaml",
                                                       "recipes/glue_intermediate/donor_finetuned.yaml"]),
    "ensembling/merge": ("validate", ["recipes/ensembling/merge.yaml"]),
    "wise_ft_vit/linear_probe": ("fit", ["configs/data/cifar10_hub.yaml", "configs/model/vit_base_hub.yaml",
                                         "recipes/wise_ft_vit/linear_probe.yaml"]),
    "wise_ft_vit/finetune": ("fit", ["configs/data/cifar10_hub.yaml", "configs/model/vit_base_hub.yaml",
                                     "recipes/wise_ft_vit/finetune.yaml"]),
    "wise_ft_vit/wise_ft": ("validate", ["recipes/wise_ft_vit/wise_ft.yaml"]),
    "wise_ft_vit/wise_ft_offline": ("validate", ["recipes/wise_ft_vit/wise_ft.yaml",
                                                 "recipes/wise_ft_vit/wise_ft_offline.yaml"]),
    "mask_fisher_multitask/merge": ("validate", ["recipes/mask_fisher_multitask/merge.yaml"]),
    "domain_adaptation/finetune": ("fit", ["configs/trainer/default.yaml", "recipes/domain_adaptation/finetune.yaml"]),
    "domain_adaptation/mlm_fisher": ("predict", ["recipes/domain_adaptation/mlm_fisher.yaml"]),
    "domain_adaptation/merge": ("validate", ["recipes/domain_adaptation/merge.yaml"]),
    "model/gpt2": ("fit", ["configs/trainer/default.yaml", "configs/model/gpt2.yaml", "configs/data/glue.yaml"]),
    "gpt2_glue/fisher": ("predict", ["configs/data/glue.yaml", "recipes/gpt2_glue/fisher.yaml"]),
    "gpt2_glue/gram": ("predict", ["configs/data/glue.yaml", "recipes/gpt2_glue/gram.yaml"]),
    "gpt2_glue/merge": ("validate", ["recipes/gpt2_glue/merge.yaml"]),
    "clip_vit_8tasks/fisher": ("predict", ["recipes/clip_vit_8tasks/fisher.yaml"]),
    "clip_vit_8tasks/gram": ("predict", ["recipes/clip_vit_8tasks/gram.yaml"]),
    "clip_vit_8tasks/merge": ("validate", ["recipes/clip_vit_8tasks/merge.yaml"]),
    "clip_vit_8tasks/finetune_offline": ("fit", ["configs/data/digits.yaml", "configs/model/clip_tiny_digits.yaml",
                                                 "recipes/clip_vit_8tasks/finetune_offline.yaml"]),
}


def test_every_yaml_is_composed_below():
    used = {f for _, files in COMPOSITIONS.values() for f in files}
    every = {str(p.relative_to(ROOT)) for d in ("configs", "recipes") for p in (ROOT / d).rglob("*.yaml")}
    assert every == used


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_every_yaml_composes_through_the_cli(name, capsys):
    subcommand, files = COMPOSITIONS[name]
    args = [subcommand] + [a for f in files for a in ("--config", str(ROOT / f))]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    if subcommand == "merge":  # streamed merging: a method and the files, no Lightning module
        assert printed["method"]["class_path"].startswith("lightning_merge.merging.")
        return
    assert printed["model"]["class_path"].startswith("lightning_merge.modules.")
    if printed["model"]["class_path"].endswith("MergeModule"):  # data per model or the module's, no trainer data
        merge = printed["model"]["init_args"]
        assert printed.get("data") is None and len(merge["models"]) >= 2
        given = [s["data"] for s in merge["models"] if s.get("data")] + ([merge["data"]] if merge.get("data") else [])
        assert given and all(d["class_path"].startswith("lightning_merge.data.") for d in given)
    else:
        assert printed["data"]["class_path"].startswith("lightning_merge.data.")


def test_training_steps_run_with_dropout_on(tiny_bert, glue_dir, tmp_path):
    """`from_pretrained` returns eval-mode models and Lightning keeps module modes: fit must switch
    the backbone to train mode (dropout on), and validation back to eval."""
    import lightning.pytorch as pl

    from lightning_merge.backbones import HFTextClassifier
    from lightning_merge.data import GlueDataModule
    from lightning_merge.modules import FineTuneModule

    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen["train"] = [m.training for m in module.backbone.model.modules()]

        def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
            seen["val"] = [m.training for m in module.backbone.model.modules()]

    backbone = HFTextClassifier(str(tiny_bert))
    assert not backbone.model.training  # what from_pretrained hands over
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False, callbacks=[Probe()],
                         default_root_dir=tmp_path)
    trainer.fit(FineTuneModule(backbone, export_dir=str(tmp_path / "export")),
                datamodule=GlueDataModule("rte", data_dir=str(glue_dir), batch_size=4))
    assert all(seen["train"]) and not any(seen["val"])


def test_freeze_body_trains_the_head_alone(tiny_bert, glue_dir, tmp_path):
    import lightning.pytorch as pl

    from lightning_merge.backbones import HFTextClassifier
    from lightning_merge.data import GlueDataModule
    from lightning_merge.modules import FineTuneModule

    backbone = HFTextClassifier(str(tiny_bert))
    before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(FineTuneModule(backbone, learning_rate=1e-2, freeze_body=True, export_dir=str(tmp_path / "e")),
                datamodule=GlueDataModule("rte", data_dir=str(glue_dir), batch_size=4))
    for name, p in backbone.model.named_parameters():
        assert torch.equal(p, before[name]) != backbone.is_head(name), name


def test_every_recipe_script_is_valid_bash():

    scripts = sorted((ROOT / "recipes").glob("*/run.sh"))
    assert len(scripts) >= 5
    for script in scripts:
        assert run_in_group(["bash", "-n", str(script)]).returncode == 0, script


def test_a_model_that_predicts_one_class_is_named(tiny_bert, glue_dir, tmp_path):
    import warnings

    import lightning.pytorch as pl

    from lightning_merge.backbones import HFTextClassifier
    from lightning_merge.data import GlueDataModule
    from lightning_merge.modules import FineTuneModule

    backbone = HFTextClassifier(str(tiny_bert))
    with torch.no_grad():
        backbone.model.classifier.bias.copy_(torch.tensor([100.0, -100.0]))  # every logit says class 0
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, default_root_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(FineTuneModule(backbone, learning_rate=0.0, export_dir=str(tmp_path / "e")),
                    datamodule=GlueDataModule("rte", data_dir=str(glue_dir), batch_size=4))
    named = [str(w.message) for w in caught if "predicts one class" in str(w.message)]
    assert named and "'entailment'" in named[0] and "all 10 examples of rte" in named[0], named


def test_progress_is_plain_lines_when_stdout_is_not_a_terminal(tmp_path):
    import sys

    from tests.processes import run_in_group

    root = Path(__file__).resolve().parents[1]
    run = run_in_group([sys.executable, "-m", "lightning_merge.cli", "fit",
                        "--config", str(root / "configs/data/digits.yaml"),
                        "--config", str(root / "configs/model/vit_tiny_digits.yaml"),
                        "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
                        "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(tmp_path),
                        "--model.init_args.export_dir", str(tmp_path / "export")], cwd=root)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stdout.splitlines() if " done: train batches " in line]
    assert [line.split(" done")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"], run.stdout[-2000:]
    assert all("3/3" in line and "val/score" in line for line in lines)
    assert "it/s" not in run.stdout and not any("\r" in line for line in lines)  # no redrawn bar in a log
