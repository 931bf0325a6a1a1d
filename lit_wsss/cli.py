"""The one command line: ``lit-wsss {fit,validate,test,predict} --config ...`` (style.md P4).

Configs are layered with repeated ``--config`` flags, left to right (experiments/<data>/_base.yaml, then
experiments/<data>/<method>.yaml, then anything else). ``data.num_classes`` is declared once, by the
DataModule, and linked into the model.
"""

from __future__ import annotations

import os

# Offline-safe defaults, before albumentations / wandb are imported (../shared/stack.md, "Pitfalls").
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI  # noqa: E402

from lit_wsss.datamodules.base import WSSSDataModule  # noqa: E402
from lit_wsss.modules.base import WSSSModule  # noqa: E402


class WSSSCLI(LightningCLI):
    """LightningCLI with subclass mode for methods and data sets and the class count linked between them."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def run_cli(args: ArgsType = None) -> WSSSCLI:
    """Build and run the CLI; ``args`` lets tests and scripts call it in-process."""
    import lit_wsss.datamodules  # noqa: F401  - registers every DataModule subclass for class_path lookup
    import lit_wsss.modules  # noqa: F401  - registers every method

    return WSSSCLI(
        WSSSModule,
        WSSSDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lit-wsss`` console script."""
    run_cli(args)
