"""The Lightning half of the command line: ``lit-wsss {fit,validate,test,predict}`` (style.md P4).

Imported by :func:`lit_wsss.cli.run_cli` only when a Trainer subcommand runs, so that the tools (``eval-cam``,
``ir-labels``, ``prepare``, ...) start without Lightning, torch or albumentations.
"""

from __future__ import annotations

from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI

from lit_wsss.datamodules.base import WSSSDataModule
from lit_wsss.modules.base import WSSSModule


class WSSSCLI(LightningCLI):
    """LightningCLI with subclass mode for methods and data sets and the class count linked between them."""

    def init_parser(self, **kwargs):  # noqa: D102 - lists the extra tools in --help
        from lit_wsss.cli import TOOLS

        kwargs.setdefault(
            "epilog", "other tools: " + "; ".join(f"lit-wsss {name} --help: {h}" for name, (_, h) in TOOLS.items())
        )
        return super().init_parser(**kwargs)

    def _parse_ckpt_path(self) -> None:
        # Lightning reads --ckpt_path here first (for the hyperparameters), and a damaged file surfaces as an
        # unpickling error that never names it: check it before ("last", "best", ... are Lightning's own names).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry"):
            from lit_wsss.checkpoints import check_weights_file

            check_weights_file(ckpt_path, "--ckpt_path", "a checkpoint written by Lightning (.ckpt)", zip_only=True)
        super()._parse_ckpt_path()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")


def build_cli(args: ArgsType = None) -> WSSSCLI:
    """Build and run the CLI (every DataModule and method registered for ``class_path`` lookup)."""
    import lit_wsss.datamodules  # noqa: F401
    import lit_wsss.modules  # noqa: F401

    return WSSSCLI(
        WSSSModule,
        WSSSDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
