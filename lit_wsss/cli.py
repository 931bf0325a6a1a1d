"""The one command line: ``lit-wsss {fit,validate,test,predict} --config ...`` (style.md P4).

Configs are layered with repeated ``--config`` flags, left to right: experiments/<data>/_base.yaml, then the
method's recipe experiments/methods/<method>.yaml (only what differs from the constructor defaults), then what the
data set changes, experiments/<data>/<method>.yaml where it exists (``lit_wsss.stages.configs``, ``make train``),
then anything else. ``data.num_classes`` is declared once, by the
DataModule, and linked into the model.
"""

from __future__ import annotations

import importlib
import os
import sys

# Offline-safe defaults, before albumentations / wandb are imported (../shared/stack.md, "Pitfalls").
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI  # noqa: E402

from lit_wsss.datamodules.base import WSSSDataModule  # noqa: E402
from lit_wsss.errors import report  # noqa: E402
from lit_wsss.modules.base import WSSSModule  # noqa: E402


class WSSSCLI(LightningCLI):
    """LightningCLI with subclass mode for methods and data sets and the class count linked between them."""

    def init_parser(self, **kwargs):  # noqa: D102 - lists the extra tools in --help
        kwargs.setdefault(
            "epilog", "other tools: " + "; ".join(f"lit-wsss {name} --help: {h}" for name, (_, h) in TOOLS.items())
        )
        return super().init_parser(**kwargs)

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


#: Subcommands that are not Trainer entry points: name -> (module, help).
TOOLS = {
    "eval-cam": ("lit_wsss.evaluation", "evaluate a CAM folder over a sweep of background thresholds"),
    "eval-seg": ("lit_wsss.eval_seg", "score a folder of label maps (segmentation predictions) against the masks"),
    "ir-labels": ("lit_wsss.refine.ir_labels", "CAMs -> confident fg/bg seeds with dense CRF (IRN step 4)"),
    "pipeline": ("lit_wsss.pipeline", "train CAM -> CAMs -> eval -> IR labels -> IRNet -> pseudo labels -> eval"),
    "gslm": ("lit_wsss.gslm_rounds", "GSLM: GLM -> seeds -> SLM rounds, each evaluated (make train METHOD=gslm)"),
    "prepare": ("lit_wsss.prepare", "convert downloaded data: labels (cls_labels.npy -> JSON), coco (masks from instances JSON)"),
    "benchmark": ("lit_wsss.benchmark", "every method under one budget file: CAM and pseudo-label mIoU, one table"),
}


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lit-wsss`` console script: LightningCLI subcommands plus the tools in ``TOOLS``."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        sys.exit(module.main(argv[1:]))
    try:
        run_cli(args)
    except Exception as error:  # noqa: BLE001 - only a ReportedError is shortened, the rest is re-raised
        code = report(error)
        if code is None:
            raise
        sys.exit(code)
