"""Nothing lost when a run dies, nothing accepted that belongs elsewhere: write order and completion
markers, stale staging, early writability checks, umask permissions, statistics provenance."""

import json
import os
import signal
import stat
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from safetensors.torch import save_file

from lightning_merge.atomic import clean_stale, staged_directory, staged_file
from lightning_merge.backbones import TimmViT
from lightning_merge.cli import main
from lightning_merge.fisher import read_fisher_metadata
from lightning_merge.merging import IsotropicMerge, merge_safetensors
from tests.fixtures import TINY_VIT
from tests.processes import run_in_group

ROOT = Path(__file__).resolve().parents[1]
DIGITS = "lightning_merge.data.ImageDataModule"


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    """Two tiny digit ViTs (different seeds) exported, each with its exact Fisher on 8 images."""
    root = tmp_path_factory.mktemp("vits")
    for seed in (1, 2):
        torch.manual_seed(seed)
        TimmViT(num_classes=10, **TINY_VIT).export(root / f"m{seed}")
        main(["predict", "--trainer.inference_mode=false", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
              "--model=lightning_merge.modules.FisherEstimationModule",
              "--model.backbone=lightning_merge.backbones.TimmViT", f"--model.backbone.checkpoint={root}/m{seed}",
              f"--model.output={root}/m{seed}.fisher.safetensors", f"--data={DIGITS}",
              "--data.max_predict_examples=8"])
    return root


def merge_config(tmp_path, vits, fishers=("m1", "m2"), **model_args):
    data = {"class_path": DIGITS, "init_args": {"max_eval_examples": 24, "eval_batch_size": 12}}
    models = [{"path": str(vits / m), "fisher": str(vits / f"{f}.fisher.safetensors"), "task": "digits",
               "name": m, "data": data, **model_args} for m, f in zip(("m1", "m2"), fishers)]
    config = {"trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                          "enable_model_summary": False, "default_root_dir": str(tmp_path)},
              "model": {"class_path": "lightning_merge.modules.MergeModule",
                        "init_args": {"models": models, "select_examples": 12, "baselines": [],
                                      "output_dir": str(tmp_path / "out"), "export_dir": str(tmp_path / "best")}}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


KILL_IN_EXPORT = textwrap.dedent("""
    import os, signal, sys
    from lightning_merge.backbones.timm_vit import TimmViT
    original = TimmViT._export_files
    def dying(self, directory):
        original(self, directory)  # the staging folder now holds the files; the process dies before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    TimmViT._export_files = dying
    from lightning_merge.cli import main
    main(["validate", "--config", sys.argv[1]])
""")


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_run_killed_during_export_is_redone_and_its_staging_cleaned(vits, tmp_path):
    config = merge_config(tmp_path, vits)
    killed = run_in_group([sys.executable, "-c", KILL_IN_EXPORT, str(config)], cwd=ROOT)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "out" / "results.csv").is_file()  # the tables came before the export ...
    assert not (tmp_path / "out" / "results.json").exists()  # ... but the completion marker comes last
    assert not (tmp_path / "best" / "m1").exists()
    assert any(name.startswith(".m1.") for name in hidden(tmp_path / "best"))  # the dead run's staging folder
    main(["validate", "--config", str(config)])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["facts"]["exported"]
    assert (tmp_path / "best" / "m1" / "lightning_merge.json").is_file()
    assert hidden(tmp_path / "best") == []


def test_a_read_only_output_dir_fails_before_evaluating(vits, tmp_path, monkeypatch):
    if os.geteuid() == 0:  # root writes anywhere: make the output location a file instead
        (tmp_path / "out").write_text("not a folder")
    else:
        (tmp_path / "out").mkdir()
        (tmp_path / "out").chmod(0o500)
    evaluated = []
    from lightning_merge.modules import merge

    monkeypatch.setattr(merge.MergeModule, "validation_step", lambda *a, **k: evaluated.append(1))
    with pytest.raises(PermissionError, match="cannot write the merge results to .*out"):
        main(["validate", "--config", str(merge_config(tmp_path, vits))])
    assert not evaluated


def test_outputs_get_the_permissions_the_umask_gives(tmp_path):
    old = os.umask(0o027)
    try:
        with staged_file(tmp_path / "a.json") as tmp:
            tmp.write_text("{}")
        with staged_directory(tmp_path / "folder") as staging:
            (staging / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o750


def test_stale_staging_of_dead_processes_is_cleaned_and_a_retired_output_restored(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".model.{dead}-abcd1234.tmp").mkdir()
    (tmp_path / f".f.json.{dead}-abcd1234.tmp.json").write_text("half")
    (tmp_path / f".model.{os.getpid()}-abcd1234.tmp").mkdir()  # a live process's: left alone
    (tmp_path / f".gone.{dead}.old").mkdir()  # moved aside by a run that died before replacing it
    clean_stale(tmp_path / "model")
    clean_stale(tmp_path / "f.json")
    clean_stale(tmp_path / "gone")
    assert hidden(tmp_path) == [f".model.{os.getpid()}-abcd1234.tmp"]
    assert (tmp_path / "gone").is_dir()


def test_a_fisher_of_another_checkpoint_is_refused_unless_opted_out(vits, tmp_path):
    header = read_fisher_metadata(vits / "m1.fisher.safetensors")
    assert len(header["model_fingerprint"]) == len(dict(TimmViT(checkpoint=str(vits / "m1")).model.named_parameters()))
    swapped = merge_config(tmp_path / "a", vits, fishers=("m2", "m1"))
    with pytest.raises(ValueError, match=r"m2.fisher.safetensors was estimated on another model .* paired with .*m1"):
        main(["validate", "--config", str(swapped)])
    opted_out = merge_config(tmp_path / "b", vits, fishers=("m2", "m1"), check_provenance=False)
    main(["validate", "--config", str(opted_out)])
    assert (tmp_path / "b" / "out" / "results.json").is_file()
    with pytest.raises(ValueError, match="was estimated on another model"):  # the streamed merge checks too
        merge_safetensors([vits / "m1", vits / "m2"], [0.5, 0.5], tmp_path / "s", _fisher_merge(),
                          fishers=[vits / "m2.fisher.safetensors", vits / "m1.fisher.safetensors"])
    merge_safetensors([vits / "m1", vits / "m2"], [0.5, 0.5], tmp_path / "s", _fisher_merge(),
                      fishers=[vits / "m1.fisher.safetensors", vits / "m2.fisher.safetensors"])


def _fisher_merge():
    from lightning_merge.merging import FisherMerge

    return FisherMerge()


def test_an_integer_fisher_is_refused(vits, tmp_path):
    params = dict(TimmViT(checkpoint=str(vits / "m1")).model.named_parameters())
    save_file({n: torch.ones(p.shape, dtype=torch.int32) for n, p in params.items()},
              tmp_path / "int.safetensors", metadata={"num_examples": "8", "variant": "exact"})
    config = merge_config(tmp_path, vits)
    spec = yaml.safe_load(config.read_text())
    spec["model"]["init_args"]["models"][0]["fisher"] = str(tmp_path / "int.safetensors")
    config.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match="has dtype torch.int32"):
        main(["validate", "--config", str(config)])
    assert not (tmp_path / "out" / "results.json").exists()
    with pytest.raises(ValueError, match="has dtype torch.int32"):
        merge_safetensors([vits / "m1", vits / "m2"], [0.5, 0.5], tmp_path / "s", _fisher_merge(),
                          fishers=[tmp_path / "int.safetensors", vits / "m2.fisher.safetensors"])
    assert not (tmp_path / "s").exists()


def test_isotropic_streamed_merge_needs_no_fisher(vits, tmp_path):
    out = merge_safetensors([vits / "m1", vits / "m2"], [0.5, 0.5], tmp_path / "iso", IsotropicMerge())
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_same_seed_same_fisher_bits_and_same_table(vits, tmp_path):
    """Two runs of a stage with the same seed: the same Fisher file, byte for byte (sampled labels
    included), and the same result table."""
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / f"{run}.safetensors"
        main(["predict", "--trainer.inference_mode=false", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
              "--model=lightning_merge.modules.FisherEstimationModule", "--model.variant=sampled",
              "--model.num_samples=2", "--model.backbone=lightning_merge.backbones.TimmViT",
              f"--model.backbone.checkpoint={vits}/m1", f"--model.output={out}", f"--data={DIGITS}",
              "--data.max_predict_examples=8"])
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    tables = []
    for run in ("a", "b"):
        main(["validate", "--config", str(merge_config(tmp_path / run, vits))])
        results = json.loads((tmp_path / run / "out" / "results.json").read_text())
        tables.append((results["results"], results["search"]))
    assert tables[0] == tables[1]


def test_inspect_describes_a_statistics_file_without_its_model(vits, monkeypatch, capsys):
    import sys as system

    from lightning_merge.cli import console_main
    from lightning_merge.fisher import load_fisher

    path = vits / "m1.fisher.safetensors"
    monkeypatch.setattr(system, "argv", ["lightning-merge", "inspect", str(path), "--tensors"])
    console_main()
    out = capsys.readouterr().out
    fisher = load_fisher(path)
    total = sum(float(v.double().sum()) for v in fisher.values())
    assert "  variant: exact" in out and "  num_examples: 8" in out
    assert f"model_fingerprint: {len(fisher)} tensors fingerprinted" in out
    values = sum(v.numel() for v in fisher.values())
    assert f"tensors: {len(fisher)} (float32), {values:,} values, sum {total:.6g}" in out
    assert "    cls_token  (1, 1, 32)  float32" in out


class _SigtermAt(pl.Callback):
    """Sends this process SIGTERM after predict batch ``at`` (Lightning records it; nothing is killed)."""

    def __init__(self, at: int) -> None:
        self.at, self.batches = at, 0

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches += 1
        if batch_idx == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("module", ["fisher", "gram"])
def test_sigterm_stops_statistics_at_the_next_batch_and_writes_nothing(tiny_bert3, glue_dir, tmp_path, module):
    from lightning_merge.backbones import HFTextClassifier
    from lightning_merge.data import GlueDataModule
    from lightning_merge.modules import FisherEstimationModule, GramEstimationModule

    output = tmp_path / "stats.safetensors"
    backbone = HFTextClassifier(str(tiny_bert3))
    estimator = FisherEstimationModule(backbone, str(output)) if module == "fisher" else \
        GramEstimationModule(backbone, str(output))
    stopper = _SigtermAt(at=1)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         inference_mode=module == "gram", callbacks=[stopper], default_root_dir=tmp_path)
    with pytest.raises(RuntimeError, match="stopped by SIGTERM after 4 examples; nothing written"):
        trainer.predict(estimator, datamodule=GlueDataModule("mnli", data_dir=str(glue_dir), eval_batch_size=2,
                                                             batch_size=2, max_predict_examples=20))
    assert stopper.batches == 2 and not output.exists()
