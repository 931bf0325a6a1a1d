"""``make demo``: train baseline CAM on the built-in synthetic set on the CPU and put its CAM mIoU next to two
trivial predictions on the same validation images.

* all-background: every pixel background;
* uniform CAM: every present class gets the same constant CAM, i.e. a CAM with no localisation at all
  (decoded like any CAM, so every pixel goes to the first labelled class).

Writes ``<out>/demo_results.json`` (numbers + protocol) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from lit_wsss.cams import cams_to_mask
from lit_wsss.cli import run_cli
from lit_wsss.metrics import MeanIoU
from lit_wsss.stages import EXPERIMENTS, configs


def trivial_baselines(dataset: Any, num_classes: int, bg_threshold: float) -> dict[str, float]:
    """mIoU of the all-background and uniform-CAM predictions over ``dataset`` (samples with ``mask``)."""
    metrics = {"all-background": MeanIoU(num_classes + 1), "uniform CAM": MeanIoU(num_classes + 1)}
    for sample in dataset:
        mask = sample["mask"][None]
        keys = torch.nonzero(sample["labels"] > 0.5).flatten()
        uniform = torch.ones(len(keys), *mask.shape[-2:])
        metrics["all-background"].update(torch.zeros_like(mask), mask)
        metrics["uniform CAM"].update(cams_to_mask(uniform, keys, bg_threshold)[None], mask)
    return {name: metric.compute().item() for name, metric in metrics.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/demo", help="run folder (checkpoints, logs, results)")
    parser.add_argument("--data-root", default="data/synthetic", help="where the synthetic set is written")
    parser.add_argument("extra", nargs="*", help="more lit-wsss arguments, e.g. --trainer.max_epochs=4")
    # `--trainer.max_epochs=4` looks like an option to argparse: what it does not know goes to the Lightning CLI
    args, unknown = parser.parse_known_args(argv)
    args.extra = [*args.extra, *unknown]
    if not (EXPERIMENTS / "synth" / "_base.yaml").is_file():
        sys.exit(f"experiments/ not found next to the package ({EXPERIMENTS}); run the demo from a checkout")
    cli = run_cli([
        "fit",
        *configs("synth", "cam"),
        f"--data.init_args.root={args.data_root}",
        f"--trainer.default_root_dir={args.out}",
        "--trainer.logger=" + json.dumps([
            {"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": args.out, "name": "cam"}},
            {"class_path": "pytorch_lightning.loggers.WandbLogger",
             "init_args": {"save_dir": args.out, "project": "lit_wsss", "name": "demo-cam", "offline": True}},
        ]),
        *args.extra,
    ])
    model, datamodule = cli.model, cli.datamodule
    results: dict[str, Any] = {
        "CAM (final weights)": float(cli.trainer.callback_metrics["val/mIoU"]),
        **trivial_baselines(datamodule.val_dataset, datamodule.num_classes, model.hparams.cam_bg_threshold),
    }
    threshold = model.hparams.cam_bg_threshold
    record = {
        "miou": results,
        "split": f"synthetic val ({len(datamodule.val_dataset)} images)",
        "threshold": {"value": threshold, "chosen": "fixed (IRN cam_eval_thres)"},
        "protocol": model.protocol(),
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    out_file = Path(args.out) / "demo_results.json"
    tmp_file = out_file.with_suffix(".json.tmp")
    tmp_file.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp_file, out_file)
    print(f"\nCAM mIoU on the synthetic val split ({len(datamodule.val_dataset)} images, background {threshold}):")
    for name, value in results.items():
        print(f"  {name:<22} {100 * value:6.2f}")
    print(f"written to {out_file}")
    return record


if __name__ == "__main__":
    main()
