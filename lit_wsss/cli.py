"""The one command line: ``lit-wsss {fit,validate,test,predict} --config ...`` (style.md P4) and the tools.

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
from typing import Any

# Offline-safe defaults, before albumentations / wandb are imported (../shared/stack.md, "Pitfalls").
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

from lit_wsss.errors import report  # noqa: E402


def run_cli(args: list[str] | None = None) -> Any:
    """Build and run the Lightning CLI (:class:`lit_wsss.trainer_cli.WSSSCLI`); ``args`` lets tests and scripts
    call it in-process. Lightning is imported here, not at the top: the tools below never need it."""
    from lit_wsss.trainer_cli import build_cli

    return build_cli(args)


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


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lit-wsss`` console script: LightningCLI subcommands plus the tools in ``TOOLS``."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv and argv[0] in TOOLS:
        module = importlib.import_module(TOOLS[argv[0]][0])
        sys.exit(module.main(argv[1:]))
    if isinstance(argv, list) and argv[:1] == ["predict"] and os.environ.get("LIT_WSSS_KEEP_FREED_MEMORY") != "0":
        # a predict process lives for one export: keeping its peak memory costs nothing and saves the page faults
        # of every scale's activations (lit_wsss.inference; LIT_WSSS_KEEP_FREED_MEMORY=0 keeps glibc's defaults)
        from lit_wsss.inference import keep_freed_memory

        keep_freed_memory()
    try:
        run_cli(args)
    except Exception as error:  # noqa: BLE001 - only a ReportedError is shortened, the rest is re-raised
        code = report(error)
        if code is None:
            raise
        sys.exit(code)
