"""The ``lightning-merge`` command: LightningCLI over the project's modules and data modules."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI, _InstantiatorFn


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

    def _add_instantiators(self) -> None:
        super()._add_instantiators()
        self.parser.add_instantiator(_TopLevelDataInstantiator(cli=self, key="data"),
                                     LightningDataModule, subclasses=True)


def main(args: Sequence[str] | None = None) -> LightningMergeCLI:
    """Entry point of the console script; tests call it with an argument list."""
    return LightningMergeCLI(
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
        args=args,
    )


def console_main() -> None:
    """The ``lightning-merge`` console script (returns nothing, so the exit status is 0 on success)."""
    main()


if __name__ == "__main__":
    console_main()
