"""`lightning-merge validate` with MergeModule: selection vs held-out, baselines, export, WiSE-FT."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_merge.backbones import TimmViT, load_backbone
from lightning_merge.cli import main
from lightning_merge.data import GlueDataModule
from lightning_merge.evaluation.ensemble import ensemble_outputs
from lightning_merge.fisher import load_fisher
from lightning_merge.merging import merge_bodies
from lightning_merge.modules import MergeModule, ModelSpec
from tests.fixtures import TINY_VIT, write_tiny_bert
from tests.processes import run_in_group

GLUE = "lightning_merge.data.GlueDataModule"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, glue_dir):
    """An RTE target and an MNLI donor (different heads), each with its exact Fisher."""
    root = tmp_path_factory.mktemp("pair")
    models = {"rte": write_tiny_bert(root / "rte", 2, seed=11), "mnli": write_tiny_bert(root / "mnli", 3, seed=12)}
    for task, path in models.items():
        main(["predict", "--trainer.inference_mode=false", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
              "--model=lightning_merge.modules.FisherEstimationModule",
              "--model.backbone=lightning_merge.backbones.HFTextClassifier", f"--model.backbone.name_or_path={path}",
              f"--model.output={root / task}.safetensors", f"--data={GLUE}", f"--data.task={task}",
              f"--data.data_dir={glue_dir}"])
    return root, models


def run_merge(tmp_path, init_args, stage="validate"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = {"trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                          "default_root_dir": str(tmp_path)},
              "model": {"class_path": "lightning_merge.modules.MergeModule", "init_args": init_args}}
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    main([stage, "--config", str(path)])
    return json.loads((tmp_path / "out" / "results.json").read_text())


def glue_spec(path, task, glue_dir, fisher=None, data=True):
    spec = {"path": str(path), "fisher": fisher}
    if data:
        args = {"task": task, "data_dir": str(glue_dir), "eval_batch_size": 3}
        spec["data"] = {"class_path": GLUE, "init_args": args}
    return spec


def logits_on(model_dir, state, glue_dir, indices):
    backbone = load_backbone(model_dir).eval()
    backbone.model.load_state_dict(state, strict=False)
    dm = GlueDataModule("rte", data_dir=str(glue_dir), tokenizer=str(model_dir))
    dm.setup("validate")
    ds = dm.splits["validation"]
    with torch.no_grad():
        return torch.cat([backbone(dm.collate([ds[i]])) for i in indices]), torch.tensor([ds[i]["labels"]
                                                                                          for i in indices])


def accuracy(logits, labels):
    return float((logits.argmax(-1) == labels).float().mean())


def test_search_selects_on_first_examples_and_reports_the_rest(pair, glue_dir, tmp_path):
    root, models = pair
    results = run_merge(tmp_path, {
        "models": [glue_spec(models["rte"], "rte", glue_dir, f"{root}/rte.safetensors"),
                   glue_spec(models["mnli"], "mnli", glue_dir, f"{root}/mnli.safetensors", data=False)],
        "search": {"class_path": "lightning_merge.merging.GridSearch", "init_args": {"points": 5}},
        "select_examples": 4, "heldout_curves": True, "output_dir": str(tmp_path / "out"),
        "export_dir": str(tmp_path / "merged")})
    assert results["facts"]["selection_examples"] == {"rte": 4} and results["facts"]["heldout_examples"] == {"rte": 6}
    rows = {r["method"]: r for r in results["results"]}
    assert set(rows) == {"unmerged", "isotropic", "fisher"}  # one RTE model: no ensemble
    states = [load_backbone(m).model.state_dict() for m in (models["rte"], models["mnli"])]
    heads = {n for s in states for n in s if n.startswith("classifier.")}
    fishers = [load_fisher(f"{root}/{t}.safetensors") for t in ("rte", "mnli")]
    for method in ("isotropic", "fisher"):
        search = [r for r in results["search"] if r["method"] == method]
        assert len(search) == 5 and search[0]["coefficients"] == [0.0, 1.0] and search[-1]["coefficients"] == [1.0, 0.0]
        # λ = (1, 0) is the target itself
        assert search[-1]["selection_score"] == pytest.approx(rows["unmerged"]["selection_score"])
        # the highest selection score; on ties the target's largest λ (the unmerged end)
        best = max(search, key=lambda r: (r["selection_score"], r["coefficients"][0]))
        assert rows[method]["coefficients"] == best["coefficients"]
        tied = sum(r["selection_score"] == best["selection_score"] for r in search)
        assert rows[method]["tied_candidates"] == tied
        merged = merge_bodies(states, best["coefficients"], fishers if method == "fisher" else None, head_names=heads)
        logits, labels = logits_on(models["rte"], merged, glue_dir, range(10))
        assert rows[method]["selection_score"] == pytest.approx(accuracy(logits[:4], labels[:4]))
        assert rows[method]["heldout_score"] == pytest.approx(accuracy(logits[4:], labels[4:]))
        assert rows[method]["full_score"] == pytest.approx(accuracy(logits, labels))
        # each part's metrics, and (heldout_curves) every candidate's held-out score, e.g. the donor end's
        assert rows[method]["rte/selection_accuracy"] == pytest.approx(accuracy(logits[:4], labels[:4]))
        assert rows[method]["rte/heldout_accuracy"] == pytest.approx(accuracy(logits[4:], labels[4:]))
        donor_end = merge_bodies(states, [0.0, 1.0], fishers if method == "fisher" else None, head_names=heads)
        logits, labels = logits_on(models["rte"], donor_end, glue_dir, range(4, 10))
        assert search[0]["heldout_score"] == pytest.approx(accuracy(logits, labels))
    # the exported model: the best method's merged body under the target's own head
    best = max((r for r in results["results"] if r["method"] in ("isotropic", "fisher")),
               key=lambda r: r["selection_score"])
    exported = load_backbone(tmp_path / "merged").model.state_dict()
    expected = merge_bodies(states, best["coefficients"], fishers if best["method"] == "fisher" else None,
                            head_names=heads)
    for name, value in expected.items():
        torch.testing.assert_close(exported[name], value, rtol=1e-6, atol=1e-7)
    assert torch.equal(exported["classifier.weight"], states[0]["classifier.weight"])
    assert (tmp_path / "out" / "score_vs_lambda.png").stat().st_size > 0
    assert (tmp_path / "out" / "results.csv").read_text().startswith("method,coefficients,selection_score")


@pytest.mark.parametrize("data_given", ["per_model", "once_for_all"])
def test_models_of_one_task_merge_heads_and_form_the_ensemble(pair, glue_dir, tmp_path, data_given):
    root, models = pair
    second = write_tiny_bert(tmp_path / "rte2", 2, seed=13)
    if data_given == "per_model":
        given = {"models": [{**glue_spec(m, "rte", glue_dir), "task": "rte"} for m in (models["rte"], second)]}
    else:  # MergeModule(data=..., data_for="all"): one data config, one label space
        given = {"models": [{"path": str(m)} for m in (models["rte"], second)], "data_for": "all",
                 "data": glue_spec("", "rte", glue_dir)["data"]}
    results = run_merge(tmp_path, {**given, "select_examples": 0.5, "output_dir": str(tmp_path / "out")})
    rows = {r["method"]: r for r in results["results"]}
    # both models evaluated, each alone: the unmerged row is their mean, with their spread
    alone = [rows["unmerged"][f"{name}/heldout_score"] for name in results["facts"]["names"]]
    assert rows["unmerged"]["heldout_score"] == pytest.approx(sum(alone) / 2)
    assert rows["unmerged"]["heldout_std"] == pytest.approx(abs(alone[0] - alone[1]) / 2 ** 0.5)
    assert (tmp_path / "out" / "models_and_merges.png").stat().st_size > 0
    assert set(rows) == {"unmerged", "ensemble", "isotropic"} and rows["isotropic"]["coefficients"] == [0.5, 0.5]
    a, la = logits_on(models["rte"], {}, glue_dir, range(10))
    b, _ = logits_on(second, {}, glue_dir, range(10))
    assert rows["ensemble"]["full_score"] == pytest.approx(accuracy(ensemble_outputs([a, b]), la))
    states = [load_backbone(m).model.state_dict() for m in (models["rte"], second)]
    averaged = {n: (states[0][n] + states[1][n]) / 2 for n in states[0]}  # the head too: one task
    merged, _ = logits_on(models["rte"], averaged, glue_dir, range(10))
    assert rows["isotropic"]["full_score"] == pytest.approx(accuracy(merged, la))


def test_data_given_once_goes_to_the_target_or_to_every_model_without_its_own():
    from lightning_merge.modules.model_pool import with_shared_data

    own, shared = GlueDataModule("rte"), GlueDataModule("mrpc")
    specs = [ModelSpec("a"), ModelSpec("b", data=own), ModelSpec("c")]
    to_target = with_shared_data(specs, shared, "target", target=2)
    assert [s.data for s in to_target] == [None, own, shared] and to_target[2].task is None
    to_all = with_shared_data(specs, shared, "all", target=0)
    assert to_all[0].data is shared and to_all[1].data is own and to_all[2].data is not shared
    assert to_all[2].data.task.name == "mrpc" and [s.task for s in to_all] == ["mrpc", None, "mrpc"]
    with pytest.raises(ValueError, match="has data of its own"):
        with_shared_data(specs, shared, "target", target=1)


def test_wise_ft_reports_every_lambda_on_iid_and_ood(tmp_path):
    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        dirs.append(TimmViT(**TINY_VIT, num_classes=10).export(tmp_path / f"vit{seed}"))
    data = {"class_path": "lightning_merge.data.ImageDataModule",
            "init_args": {"in_chans": 3, "eval_shifts": ["rotate"], "max_eval_examples": 30, "eval_batch_size": 16}}
    results = run_merge(tmp_path, {
        "models": [{"path": str(dirs[0]), "data": data, "task": "digits"}, {"path": str(dirs[1]), "task": "digits"}],
        "methods": [{"class_path": "lightning_merge.merging.IsotropicMerge"}],
        "search": {"class_path": "lightning_merge.merging.GridSearch", "init_args": {"points": 3}},
        "report": "all", "baselines": ["unmerged"], "select_examples": 10, "output_dir": str(tmp_path / "out")})
    rows = [r for r in results["results"] if r["method"] == "isotropic"]
    assert [r["coefficients"] for r in rows] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    assert all(not math.isnan(r["digits/rotate/accuracy"]) and r["heldout_score"] is not None for r in rows)
    unmerged = next(r for r in results["results"] if r["method"] == "unmerged")
    assert rows[-1]["digits/rotate/accuracy"] == pytest.approx(unmerged["digits/rotate/accuracy"])
    assert rows[-1]["full_score"] == pytest.approx(unmerged["full_score"])
    assert (tmp_path / "out" / "iid_vs_ood.png").stat().st_size > 0


def test_bad_specs_are_refused_up_front(pair, glue_dir):
    root, models = pair
    data = GlueDataModule("rte", data_dir=str(glue_dir))
    from lightning_merge.merging import FisherMerge

    with pytest.raises(ValueError, match=r"fisher needs `fisher` for every model; models \[1\]"):
        MergeModule([ModelSpec(str(models["rte"]), fisher="x", data=data), ModelSpec(str(models["mnli"]))],
                    methods=[FisherMerge()])
    with pytest.raises(ValueError, match="at least 2 models"):
        MergeModule([ModelSpec(str(models["rte"]), data=data)])
    with pytest.raises(ValueError, match="no model has `data`"):
        MergeModule([ModelSpec(str(models["rte"])), ModelSpec(str(models["mnli"]))])
    module = MergeModule([ModelSpec(str(models["mnli"]), data=data), ModelSpec(str(models["rte"]))])
    with pytest.raises(ValueError, match="has 3 outputs but its data .* has 2 labels"):
        module.setup("validate")


def test_two_processes_report_what_one_does(pair, glue_dir, tmp_path):
    """DDP pads the 5 selection / 5 held-out examples to 6 with repeats: each must count once."""
    root, models = pair
    args = {"models": [glue_spec(models["rte"], "rte", glue_dir, f"{root}/rte.safetensors"),
                       glue_spec(models["mnli"], "mnli", glue_dir, f"{root}/mnli.safetensors", data=False)],
            "search": {"class_path": "lightning_merge.merging.GridSearch", "init_args": {"points": 3}},
            "select_examples": 5}
    one = run_merge(tmp_path / "one", {**args, "output_dir": str(tmp_path / "one" / "out")})
    config = {"trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp", "logger": False,
                          "default_root_dir": str(tmp_path),
                          "enable_progress_bar": False},
              "model": {"class_path": "lightning_merge.modules.MergeModule",
                        "init_args": {**args, "output_dir": str(tmp_path / "two")}}}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "lightning_merge.cli", "validate", "--config", str(tmp_path / "two.yaml")]
    run = run_in_group(command, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["results"] == one["results"] and two["search"] == one["search"]


def test_an_unlabeled_test_split_is_refused(pair, glue_dir, tmp_path):
    root, models = pair
    test = tmp_path / "test.tsv"
    test.write_text("index\tsentence1\tsentence2\n0\tthe cat sat\ta dog runs\n")  # GLUE test: no labels
    data = GlueDataModule("rte", data_dir=str(glue_dir), test_file=str(test))
    module = MergeModule([ModelSpec(str(models["rte"]), data=data), ModelSpec(str(models["mnli"]))])
    with pytest.raises(ValueError, match="test split of rte has no labels"):
        module.setup("test")
