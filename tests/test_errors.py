"""A bad option or file is one clear line: the project's own message is the first and last line the
user sees (`lightning-merge` exits with status 2), and data errors name the file."""

import re
import sys
from pathlib import Path

import pytest

from lightning_merge.cli import console_main
from lightning_merge.data import GlueDataModule

ROOT = Path(__file__).resolve().parents[1]
VIT = ["--config", str(ROOT / "configs/model/vit_tiny_digits.yaml")]
DIGITS = ["--config", str(ROOT / "configs/data/digits.yaml")]
MERGE = ["--config", str(ROOT / "recipes/quickstart/merge.yaml")]


def run_cli(monkeypatch, capfd, *args):
    monkeypatch.setattr(sys, "argv", ["lightning-merge", *args])
    with pytest.raises(SystemExit) as exit_info:
        console_main()
    out, err = capfd.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    return exit_info.value.code, lines


@pytest.mark.parametrize(("args", "message"), [
    (["fit", *VIT, "--data=lightning_merge.data.GlueDataModule", "--data.task=bogus"],
     r"^error: Unknown task 'bogus'; known tasks: cola, sst2"),
    (["fit", *VIT, *DIGITS, "--model.init_args.backbone.init_args.img_size=9"],
     r"^error: TimmViT: img_size=9 is not divisible by patch_size=2$"),
    (["fit", *VIT, *DIGITS, "--data.init_args.train_shift=bogus"],
     r"^error: .*\"train_shift\": expected one of 'none', .*'blur' Given value: bogus \(lightning-merge fit --help"),
    (["validate", *MERGE, "--model.init_args.search.init_args.points=1"],
     r"^error: .*\"points\": Not of type GridPoints: 1 does not conform to restriction v>=2"),
    (["validate", *MERGE, "--model.init_args.target=5"], r"^error: MergeModule\(target=5\): out of range for 2 models"),
    (["predict", *DIGITS, "--config", str(ROOT / "configs/fisher/exact.yaml"),
      "--model.init_args.variant=exactly"], r"^error: .*\"variant\": expected one of"),
    (["fit", *VIT, *DIGITS, "--trainer.max_epochs=abc"], r"^error: .*\"trainer.max_epochs\": expected int"),
    (["fit", "--config", str(ROOT / "configs/model/minilm.yaml"), "--config", str(ROOT / "configs/data/glue.yaml"),
      "--model.init_args.backbone.init_args.name_or_path=/no/such/model"],
     r"^error: /no/such/model: is not a local folder, nor a model the hub gives"),
    (["validate", *MERGE, "--model.init_args.search=lightning_merge.merging.FixedCoefficients",
      "--model.init_args.search.init_args.coefficients=[1, 2, 3]"], r"^error: FixedCoefficients: 3 coefficients for 2"),
])
def test_input_errors_are_one_clear_line(monkeypatch, capfd, tmp_path, args, message):
    monkeypatch.chdir(tmp_path)
    code, lines = run_cli(monkeypatch, capfd, *args)
    assert code == 2
    assert len(lines) == 1, lines  # first and last line are the project's message
    assert re.search(message, lines[0]), lines[0]


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only input errors are shortened: an unexpected exception propagates whole."""
    from lightning_merge import cli

    monkeypatch.setattr(cli, "main", lambda: (_ for _ in ()).throw(ZeroDivisionError("bug")))
    with pytest.raises(ZeroDivisionError):
        cli.console_main()


def test_help_names_the_stages_and_the_project_classes(monkeypatch, capfd):
    monkeypatch.setattr(sys, "argv", ["lightning-merge", "--help"])
    with pytest.raises(SystemExit):
        console_main()
    text = capfd.readouterr().out
    for word in ("fit ", "predict ", "validate ", "FineTuneModule", "FisherEstimationModule", "MergeModule",
                 "GlueDataModule", "ImageDataModule", "TimmViT", "HFTextClassifier", "FisherMerge", "GridSearch"):
        assert word in text
    monkeypatch.setattr(sys, "argv", ["lightning-merge", "fit", "--help"])
    with pytest.raises(SystemExit):
        console_main()
    assert "lightning_merge.modules.FineTuneModule" in capfd.readouterr().out


GLUE_HEADER = "index\tsentence1\tsentence2\tlabel\n"


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"bad\.tsv is empty"),
    (GLUE_HEADER.encode(), r"bad\.tsv has no examples \(only a header"),
    (GLUE_HEADER.encode() + b"0\ta\tb\tentailment\n1\tcaf\xe9\tb\tentailment\n", r"bad\.tsv, line 3: not UTF-8 text"),
    (GLUE_HEADER.encode() + b"0\ta\tb\t0\n1\ta\tb\t-1\n", r"bad\.tsv, example 2: label -1 \(unlabeled\)"),
    (GLUE_HEADER.encode() + b"0\ta\tb\tmaybe\n", r"bad\.tsv, example 1: label 'maybe' is not one of"),
])
@pytest.mark.parametrize("split", ["train", "validation"])
def test_data_errors_name_the_file_at_setup(tmp_path, tiny_bert, content, message, split):
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(content)
    good = tmp_path / "good.tsv"
    good.write_text(GLUE_HEADER + "0\ta\tb\tentailment\n")
    files = {"train_file": str(good), "validation_file": str(good), f"{split}_file": str(bad)}
    dm = GlueDataModule("rte", tokenizer=str(tiny_bert), **files)
    with pytest.raises(ValueError, match=message):
        dm.setup("fit")  # at setup, before any training step
