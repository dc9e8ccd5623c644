"""The CLIP vision family: a zero-shot head from the text tower (or a linear one) on the normalized image
embedding. Zero-shot weights against CLIP's own text features, Fisher (full, sampled, mask-node) against
the batch-1 loop, export/reload, and a merge through ``MergeModule``."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPModel

from lightning_merge.backbones import HFCLIPClassifier, load_backbone
from lightning_merge.cli import main
from lightning_merge.fisher import logit_directions
from lightning_merge.fisher.masks import MaskFisherEngine
from tests.fixtures import write_tiny_clip
from tests.test_fisher_engine import assert_matches, engine_and_loop
from tests.test_mask_fisher import reference_mask_fisher

CLASSES = ["zero", "one", "two"]
TEMPLATES = ["a photo of a {}.", "a {}"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"), seed=3)


def image_batch(n=4):
    return {"pixel_values": torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0)),
            "labels": torch.arange(n) % len(CLASSES)}


def test_zero_shot_head_is_clips_normalized_mean_text_embedding(clip_dir):
    backbone = HFCLIPClassifier(str(clip_dir), class_names=CLASSES, templates=TEMPLATES).eval()
    clip, tokenizer = CLIPModel.from_pretrained(clip_dir).eval(), AutoTokenizer.from_pretrained(clip_dir)
    with torch.no_grad():
        expected = []
        for name in CLASSES:
            for_class = []
            for template in TEMPLATES:  # one prompt at a time, no padding
                tokens = tokenizer(template.format(name), return_tensors="pt")
                e = clip.get_text_features(**tokens)
                e = getattr(e, "pooler_output", e)[0]
                for_class.append(e / e.norm())
            mean = torch.stack(for_class).mean(0)
            expected.append(mean / mean.norm())
        torch.testing.assert_close(backbone.model.head.weight, torch.stack(expected), rtol=1e-5, atol=1e-6)
        image = clip.get_image_features(pixel_values=image_batch()["pixel_values"])
        image = getattr(image, "pooler_output", image)
        logits = 100 * (image / image.norm(dim=-1, keepdim=True)) @ torch.stack(expected).T
        torch.testing.assert_close(backbone(image_batch()), logits, rtol=1e-4, atol=1e-4)
    assert not backbone.model.head.weight.requires_grad  # frozen: only the image tower is fine-tuned
    assert backbone.head_prefixes == ("head.",) and backbone.img_size == 8


@pytest.mark.parametrize("variant", ["exact", "sampled"])
def test_full_fisher_matches_the_batch1_loop_in_fp32(clip_dir, variant):
    backbone = HFCLIPClassifier(str(clip_dir), class_names=CLASSES).eval()
    fast, slow = engine_and_loop(backbone, image_batch(), variant)
    assert {"vision.vision_model.embeddings.class_embedding", "vision.visual_projection.weight",
            "vision.vision_model.embeddings.patch_embedding.weight"} <= set(fast)
    assert not any(n.startswith("head.") for n in fast)  # the frozen zero-shot head has none
    assert_matches(fast, slow, rtol=1e-5)


def test_mask_fisher_matches_explicit_masks(clip_dir):
    backbone = HFCLIPClassifier(str(clip_dir), class_names=CLASSES).eval()
    batch = image_batch()
    sites = backbone.mask_sites()
    assert [s.units for s in sites] == [4, 37, 4, 37]
    engine = MaskFisherEngine(backbone.model, sites)
    with engine.capture(4):
        logits = backbone(batch)
        engine.accumulate(logits, logit_directions(logits, "exact"))
    engine.detach()
    for name, ref in reference_mask_fisher(backbone, batch, 4).items():
        torch.testing.assert_close(engine.sums[name].double() / 4, ref, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("head", ["zero_shot", "linear"])
def test_export_reloads_the_same_logits(clip_dir, tmp_path, head):
    kwargs = {"class_names": CLASSES} if head == "zero_shot" else {"num_labels": 3}
    backbone = HFCLIPClassifier(str(clip_dir), head=head, **kwargs).eval()
    backbone.export(tmp_path / "export")
    reloaded = load_backbone(tmp_path / "export").eval()
    assert isinstance(reloaded, HFCLIPClassifier) and reloaded.kind == head
    with torch.no_grad():
        torch.testing.assert_close(reloaded(image_batch()), backbone(image_batch()), rtol=0, atol=0)
    assert reloaded.model.head.weight.requires_grad == (head == "linear")


def test_a_tower_from_a_config_and_the_data_names_the_zero_shot_classes(clip_dir):
    tower = HFCLIPClassifier(head="linear", num_labels=10, config=dict(
        image_size=8, patch_size=2, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        projection_dim=8))
    assert tower(image_batch()).shape == (4, 10)
    lazy = HFCLIPClassifier(str(clip_dir))
    with pytest.raises(RuntimeError, match="no classes yet"):
        lazy(image_batch())
    lazy.describe_task(CLASSES)
    assert lazy.num_labels == 3 and lazy.label_names == CLASSES


def test_merge_module_merges_two_clip_towers_on_digits(clip_dir, tmp_path):
    towers = []
    for seed in (0, 1):  # two "fine-tunes": the same tower with different noise on the image side
        backbone = HFCLIPClassifier(str(clip_dir), head="linear", num_labels=10)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            for p in backbone.model.vision.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        towers.append(backbone.export(tmp_path / f"tower{seed}"))
    fishers = [tmp_path / f"f{i}.safetensors" for i in range(2)]
    for tower, output in zip(towers, fishers):
        main(["predict", "--trainer.inference_mode=false", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
              "--model=lightning_merge.modules.FisherEstimationModule",
              "--model.backbone=lightning_merge.backbones.HFCLIPClassifier", f"--model.backbone.name_or_path={tower}",
              "--model.backbone.head=linear", f"--model.output={output}", "--data=lightning_merge.data.ImageDataModule",
              "--data.max_predict_examples=12"])
    digits = {"class_path": "lightning_merge.data.ImageDataModule", "init_args": {"max_eval_examples": 40}}
    config = {"trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                          "default_root_dir": str(tmp_path)},
              "model": {"class_path": "lightning_merge.modules.MergeModule", "init_args": {
                  "models": [{"path": str(t), "fisher": str(f), "task": "digits", "data": digits}
                             for t, f in zip(towers, fishers)],
                  "methods": [{"class_path": "lightning_merge.merging.FisherMerge"}],
                  "output_dir": str(tmp_path / "out"), "export_dir": str(tmp_path / "merged")}}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    main(["validate", "--config", str(tmp_path / "merge.yaml")])
    rows = {r["method"]: r for r in json.loads((tmp_path / "out" / "results.json").read_text())["results"]}
    assert {"unmerged", "ensemble", "fisher"} <= set(rows)
    exported = load_backbone(tmp_path / "merged" / "digits_0")
    states = [dict(load_backbone(t).model.named_parameters()) for t in towers]
    fisher = [load_file(f) for f in fishers]
    name = "vision.vision_model.encoder.layers.1.mlp.fc1.weight"  # eq. 4 with λ = ½ each
    f0, f1 = fisher[0][name], fisher[1][name]
    expected = (f0 * states[0][name] + f1 * states[1][name]) / (f0 + f1)
    expected = torch.where((f0 < 1e-6) & (f1 < 1e-6), states[0][name], expected)  # the floor: the target there
    torch.testing.assert_close(dict(exported.model.named_parameters())[name].detach(), expected.detach(),
                               rtol=1e-5, atol=1e-7)


def test_offline_clip_recipe_runs_end_to_end(tmp_path):
    """recipes/clip_vit_8tasks with VARIANT=offline, reduced to a couple of batches per stage: a tiny CLIP
    tower from a config, four fine-tunes, full/mask Fisher and Grams, every merge method."""
    import csv
    import os
    from pathlib import Path

    from tests.processes import run_in_group

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "VARIANT": "offline", "OUT_DIR": str(tmp_path),
           "EXTRA_ARGS": "--trainer.max_epochs 1 --trainer.limit_train_batches 2 --trainer.limit_val_batches 1 "
                         "--trainer.enable_progress_bar false",
           "FISHER_EXAMPLES": "16", "GRAM_EXAMPLES": "16", "FISHER_ARGS": "--trainer.enable_progress_bar false",
           "MERGE_ARGS": "--model.init_args.scale_search.init_args.values [0.5,1.0] "
                         "--model.init_args.select_examples 40 --trainer.enable_progress_bar false"}
    run = run_in_group(["bash", str(root / "recipes/clip_vit_8tasks/run.sh")], env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "merge" / "results.csv").open())}
    assert {"unmerged", "averaging", "task_arithmetic", "ties", "fisher", "mask_fisher", "regmean"} <= set(rows)
    assert all(0 <= float(r["rotate/heldout_score"]) <= 1 for r in rows.values())
    exported = load_backbone(tmp_path / "merge" / "best_model" / "rotate")
    assert isinstance(exported, HFCLIPClassifier) and exported.kind == "linear"


def test_a_tower_without_head_gets_its_classes_from_the_data_in_every_stage(clip_dir, tmp_path):
    """A plain CLIP checkpoint (no export, no class names given): the Fisher stage builds the zero-shot
    head from the data's class names before `auto` chooses by its size, and the merge stage before it
    compares head and label counts."""
    from lightning_merge.fisher import read_fisher_metadata

    output = tmp_path / "f.safetensors"
    main(["predict", "--trainer.inference_mode=false", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
          "--model=lightning_merge.modules.FisherEstimationModule",
          "--model.backbone=lightning_merge.backbones.HFCLIPClassifier", f"--model.backbone.name_or_path={clip_dir}",
          "--model.max_exact_classes=4", f"--model.output={output}", "--data=lightning_merge.data.ImageDataModule",
          "--data.max_predict_examples=6"])
    meta = read_fisher_metadata(output)
    assert meta["num_labels"] == 10 and meta["variant"] == "sampled"
    assert meta["variant_reason"].startswith("auto: 10 labels > max_exact_classes 4")
    digits = {"class_path": "lightning_merge.data.ImageDataModule", "init_args": {"max_eval_examples": 20}}
    results = tmp_path / "out"
    config = {"trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                          "default_root_dir": str(tmp_path)},
              "model": {"class_path": "lightning_merge.modules.MergeModule", "init_args": {
                  "models": [{"path": str(clip_dir), "task": "digits", "name": n, "data": digits} for n in ("a", "b")],
                  "methods": [{"class_path": "lightning_merge.merging.IsotropicMerge"}],
                  "output_dir": str(results)}}}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    main(["validate", "--config", str(tmp_path / "merge.yaml")])
    rows = {r["method"]: r for r in json.loads((results / "results.json").read_text())["results"]}
    assert rows["isotropic"]["full_score"] == pytest.approx(rows["unmerged"]["full_score"])  # the same tower twice
