"""The ``lightning-merge`` command: LightningCLI over the project's modules and data modules."""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class LightningMergeCLI(LightningCLI):
    """``fit / validate / test / predict`` with ``--config`` (repeatable) and ``--print_config``.

    Models and data are chosen by ``class_path`` in YAML (any LightningModule / DataModule),
    so later stages (Fisher, merge) plug in without new entry points.
    """


def main(args: Sequence[str] | None = None) -> LightningMergeCLI:
    """Entry point of the console script; tests call it with an argument list."""
    return LightningMergeCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
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
