"""The ``lightning-merge`` command: LightningCLI over the project's modules and data modules."""

from __future__ import annotations

import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ArgumentError, DefaultHelpFormatter
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningCLI, _InstantiatorFn

# Imported so that `--help` lists them as the known subclasses of each option.
import lightning_merge.backbones as _backbones
import lightning_merge.data as _data
import lightning_merge.merging as _merging
from lightning_merge import quiet
from lightning_merge.progress import PlainProgress

DEBUG_ENV = "LIGHTNING_MERGE_DEBUG"  # set to 1 for full tracebacks of input errors


def _names(module, kind: type | None = None) -> str:
    names = [n for n in module.__all__ if isinstance(getattr(module, n), type)
             and (kind is None or (issubclass(getattr(module, n), kind) and getattr(module, n) is not kind))]
    return ", ".join(names)


DESCRIPTION = f"""\
Fisher-weighted model merging as Lightning stages; every stage is one subcommand and YAML configs:

  fit        fine-tune a model        model: FineTuneModule
  predict    estimate statistics      model: FisherEstimationModule (full or mask-node Fisher)
  validate   merge and evaluate       model: MergeModule (coefficient search, held-out scores, export)
  test       merge and evaluate on the test split
  merge      merge checkpoints file to file, streamed (no evaluation): merge_checkpoints
  inspect    a statistics file's header, tensors and totals (no model needed)

Project classes (choose them by class_path in YAML):
  data modules:     {_names(_data, LightningDataModule)}
  backbones:        {_names(_backbones, _backbones.Backbone)}
  merge methods:    {_names(_merging, _merging.MergeMethod)}
  searches:         {_names(_merging, _merging.CoefficientSearch)}

Examples: `lightning-merge fit --config recipes/quickstart/pretrain.yaml --print_config`,
          `lightning-merge validate --help`, `lightning-merge fit --model.help FineTuneModule`.
Input errors are printed as one line; {DEBUG_ENV}=1 shows the full traceback."""

STAGE_HELP = {
    "fit": "Fine-tune a model (FineTuneModule) and export it in its native format.",
    "validate": "Merge models and evaluate them on validation data (MergeModule).",
    "test": "Merge models and evaluate them on test data (MergeModule).",
    "predict": "Estimate statistics of a model, e.g. its Fisher (FisherEstimationModule); writes safetensors.",
}


class _HelpFormatter(DefaultHelpFormatter):
    """Keeps the line breaks of descriptions (the stage table above)."""

    def _fill_text(self, text, width, indent):
        return "".join(indent + line for line in text.splitlines(keepends=True))


class _TopLevelDataInstantiator(_InstantiatorFn):
    """Lightning's data instantiator hands every DataModule the hyper-parameters of the top-level
    ``data`` entry (and fails when there is none). The merge stage nests one DataModule per model
    inside ``model``, with no top-level ``data``: those are built as they are written."""

    def __call__(self, class_type, *args, applied_instantiation_links: dict, **kwargs):
        self.cli._dump_config()
        if not self.cli.config_dump.get(self.key):
            return class_type(*args, **kwargs)
        return super().__call__(class_type, *args, applied_instantiation_links=applied_instantiation_links, **kwargs)


class LightningMergeCLI(LightningCLI):
    """``fit / validate / test / predict`` with ``--config`` (repeatable) and ``--print_config``.

    Models and data are chosen by ``class_path`` in YAML (any LightningModule / DataModule),
    so later stages (Fisher, merge) plug in without new entry points.
    """

    def instantiate_trainer(self, **kwargs):
        """The trainer; when stdout is not a terminal, Lightning's redrawn progress bar becomes plain lines."""
        trainer = super().instantiate_trainer(**kwargs)
        if not sys.stdout.isatty():
            trainer.callbacks = [PlainProgress() if isinstance(c, (TQDMProgressBar, RichProgressBar)) else c
                                 for c in trainer.callbacks]
        return trainer

    def _add_instantiators(self) -> None:
        super()._add_instantiators()
        self.parser.add_instantiator(_TopLevelDataInstantiator(cli=self, key="data"),
                                     LightningDataModule, subclasses=True)


MERGE_STAGE, INSPECT = "merge", "inspect"


def inspect_files(args: Sequence[str]) -> None:
    """``lightning-merge inspect FILE... [--tensors]``: a statistics file's header, tensors and totals."""
    import argparse

    from lightning_merge.fisher.io import describe_statistics

    parser = argparse.ArgumentParser(prog="lightning-merge inspect", description=inspect_files.__doc__)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--tensors", action="store_true", help="one line per tensor (shape, dtype, sum, max)")
    parsed = parser.parse_args(list(args))
    for path in parsed.files:
        print(describe_statistics(path, parsed.tensors))


def merge_files(args: Sequence[str]):
    """``lightning-merge merge --config FILE.yaml``: :func:`~lightning_merge.merging.merge_checkpoints`
    with its arguments from YAML or flags (``--help`` lists them), e.g. two checkpoints larger than memory."""
    from jsonargparse import ArgumentParser

    from lightning_merge.merging.streaming import merge_checkpoints

    parser = ArgumentParser(prog="lightning-merge merge", description=merge_checkpoints.__doc__.split("\n")[0],
                            exit_on_error=False, formatter_class=_HelpFormatter)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(merge_checkpoints)
    config = parser.parse_args(list(args))
    init = parser.instantiate_classes(config)
    return merge_checkpoints(**{k: v for k, v in init.items() if k != "config"})


def main(args: Sequence[str] | None = None) -> LightningMergeCLI:
    """Entry point of the console script; tests call it with an argument list."""
    quiet.install()
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == [MERGE_STAGE]:
        return merge_files(argv[1:])
    if argv[:1] == [INSPECT]:
        return inspect_files(argv[1:])
    # exit_on_error=False: a parse error is raised (and printed as one line by console_main), not
    # printed after fifty lines of usage.
    common = {"formatter_class": _HelpFormatter, "exit_on_error": False}
    parser_kwargs = {"description": DESCRIPTION, **common,
                     **{stage: {"description": text, **common} for stage, text in STAGE_HELP.items()}}
    cli = LightningMergeCLI(
        LightningModule,
        # No data class: `data` is then optional (any DataModule by class_path), because the merge stage
        # reads each model's evaluation data from its own spec instead.
        None,
        subclass_mode_model=True,
        # Pinned, not random (Lightning's `True`), so recipes are reproducible by default.
        seed_everything_default=0,
        # Each stage usually has its own directory; re-running a stage must not fail on config.yaml.
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_kwargs=parser_kwargs,
        args=args,
    )
    summary = getattr(getattr(cli, "model", None), "summary", None)
    if summary and cli.trainer.is_global_zero:  # the stage's last line: what was written where
        print(f"lightning-merge {cli.subcommand}: {summary}", flush=True)
    return cli


_INPUT_ERRORS = (ValueError, KeyError, IndexError, FileNotFoundError, PermissionError, NotImplementedError,
                 RuntimeError, UnicodeDecodeError, IsADirectoryError, NotADirectoryError)
_PACKAGE = str(Path(__file__).resolve().parent)


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by this package's own code (its innermost frame is ours)."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and str(Path(frames[-1].filename).resolve()).startswith(_PACKAGE)


def input_error(err: BaseException) -> BaseException | None:
    """The project's own input error behind ``err`` (through the chain of causes jsonargparse and
    Lightning wrap it in), or None for anything else (a bug: that keeps its traceback)."""
    seen, stack, found = set(), [err], None
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, _INPUT_ERRORS) and _raised_here(current):
            found = current  # keep the innermost: the original error, not a wrapper of it
        stack += [current.__cause__, current.__context__]
    return found


def message_of(err: BaseException) -> str:
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split())  # one line, whatever the message's own line breaks


_UNION_CHATTER = re.compile(r"Does not validate against any of the Union subtypes|^Subtypes:|^Given value type|"
                            r"Expected a <class 'NoneType'>|^tip: For details|^Errors:$")


def parse_error_line(message: str) -> str:
    """jsonargparse's multi-line report of a bad option, as one line: the option, then only the reasons
    (not the list of union subtypes tried, nor the value echoed back)."""
    lines = [line.strip().lstrip("- ").strip() for line in message.splitlines()]
    kept = [line for line in lines if line and not _UNION_CHATTER.search(line)
            and not (line.startswith("Given value:") and (len(line) > 80 or "NestedArg(" in line))]
    text = " ".join(kept)
    text = re.sub(r"Expected a typing\.Literal\[(.*?)\]", r"expected one of \1", text)
    return re.sub(r"Expected a <class '(\w+)'>", r"expected \1", text)


def console_main() -> None:
    """The ``lightning-merge`` console script: exit status 0 on success; an input error (bad option,
    file, data) is printed as one line, ``error: <what is wrong>``, with exit status 2."""
    try:
        main()
    except ArgumentError as err:
        command = " ".join(["lightning-merge", *([_subcommand()] if _subcommand() else []), "--help"])
        print(f"error: {parse_error_line(str(err))} ({command} lists the options)", file=sys.stderr)
        sys.exit(2)
    except Exception as err:  # noqa: BLE001 -- sorted below: input errors one line, bugs with traceback
        cause = input_error(err)
        if cause is None or os.environ.get(DEBUG_ENV) == "1":
            raise
        print(f"error: {message_of(cause)}", file=sys.stderr)
        sys.exit(2)


def _subcommand() -> str:
    return next((a for a in sys.argv[1:] if a in STAGE_HELP or a in (MERGE_STAGE, INSPECT)), "")


if __name__ == "__main__":
    console_main()
