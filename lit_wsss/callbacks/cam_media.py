"""``CAMMedia``: the validation figures, as PNG files and in W&B (rank 0 only).

Per validation epoch (not the sanity check):
* a CAM panel (a segmentation network: its class probabilities) for a fixed handful of validation images (the first ``num_images`` of the split): image, CAM
  heat map per labelled class, predicted vs ground-truth masks with class names; in W&B also as an
  interactive image with prediction / ground-truth mask layers;
* the per-class IoU table at the fixed threshold and at the oracle threshold of the sweep;
* the threshold-sweep curve (``lit_wsss.evaluation.plot_sweep``).

PNG / Markdown files go to ``<log dir>/media/epoch_<NNN>/`` for users without W&B. The sweep itself is
reduced across ranks by the module (``CAMHeadMixin.on_validation_epoch_end``); this callback only reads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import WandbLogger

from lit_wsss.datamodules.files import read_rgb
from lit_wsss.evaluation import plot_sweep, sweep_markdown
from lit_wsss.io import write_bytes_atomic
from lit_wsss.visualize import cam_panel


class CAMMedia(Callback):
    """Save (and log to W&B) the CAM panel, the per-class IoU table and the sweep curve.

    Args:
        num_images: validation images in the panel (always the first ones of the split, so epochs compare).
        every_n_epochs: how often.
        out_dir: where the files go; default ``<trainer.log_dir or default_root_dir>/media``.
    """

    def __init__(self, num_images: int = 4, every_n_epochs: int = 1, out_dir: str | None = None) -> None:
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.out_dir = out_dir

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not hasattr(pl_module, "media_record"):
            return  # (a module without maps, e.g. SLAMs' stage-A encoder, has no figures)
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        # None for a method with its own background (SIPE): panels only, no sweep table or curve
        summary = getattr(pl_module, "val_sweep_summary", None)
        root = Path(self.out_dir or trainer.log_dir or trainer.default_root_dir) / "media"
        folder = root / f"epoch_{trainer.current_epoch:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        names = summary["class_names"][1:] if summary else pl_module.class_names()
        panels, wandb_images = self._panels(trainer, pl_module, names)
        if panels:
            _save_png(folder / "cam_panel.png", np.concatenate(_pad_widths(panels), axis=0))
        if summary:
            write_bytes_atomic(folder / "iou_table.md", sweep_markdown(summary).encode())
            plot_sweep(summary, folder / "sweep_curve.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._log_wandb(logger, trainer, summary, folder, wandb_images, ["background", *names])

    @torch.no_grad()
    def _panels(self, trainer: pl.Trainer, pl_module: Any, class_names: list[str]) -> tuple[list, list]:
        dataset = getattr(trainer.datamodule, "val_dataset", None)
        if dataset is None:
            return [], []
        was_training = pl_module.training
        pl_module.eval()
        panels, wandb_images = [], []
        for index in range(min(self.num_images, len(dataset))):
            sample = dataset[index]
            record = pl_module.media_record(sample["image"].to(pl_module.device), sample["labels"].to(pl_module.device))
            image = read_rgb(dataset.image_paths[index])
            arrays = {
                "high_res": record["high_res"].cpu().numpy(),
                "keys": record["keys"].cpu().numpy(),
                "prediction": record["prediction"].cpu().numpy().astype(np.uint8),
                "ground_truth": sample["mask"].numpy().astype(np.uint8),
            }
            panels.append(cam_panel(image, class_names=class_names, title=sample["image_id"], **arrays))
            wandb_images.append((sample["image_id"], image, arrays["prediction"], arrays["ground_truth"]))
        pl_module.train(was_training)
        return panels, wandb_images

    @staticmethod
    def _log_wandb(logger: WandbLogger, trainer: pl.Trainer, summary: dict | None, folder: Path, images: list,
                   class_names: list[str]) -> None:
        import wandb

        labels = {i: name for i, name in enumerate(class_names)}
        labels[255] = "ignore"
        payload: dict[str, Any] = {
            "val/masks": [
                wandb.Image(image, caption=image_id, masks={
                    "prediction": {"mask_data": prediction, "class_labels": labels},
                    "ground_truth": {"mask_data": truth, "class_labels": labels},
                })
                for image_id, image, prediction, truth in images
            ],
        }
        if (folder / "cam_panel.png").is_file():
            payload["val/cam_panel"] = wandb.Image(str(folder / "cam_panel.png"),
                                                   caption="image | CAMs | prediction | truth")
        if summary is None:
            logger.experiment.log({**payload, "trainer/global_step": trainer.global_step})
            return
        payload["val/sweep_curve"] = wandb.Image(str(folder / "sweep_curve.png"))
        rows = []
        for index, name in enumerate(summary["class_names"]):
            rows.append([name, summary["fixed"]["iou"][index], summary["best"]["iou"][index]])
        payload["val/iou_table"] = wandb.Table(
            columns=["class", f"IoU @ fixed {summary['fixed']['threshold']:g}",
                     f"IoU @ oracle {summary['best']['threshold']:g}"],
            data=rows,
        )
        logger.experiment.log({**payload, "trainer/global_step": trainer.global_step})


def _pad_widths(rows: list[np.ndarray]) -> list[np.ndarray]:
    width = max(row.shape[1] for row in rows)
    return [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rows]


def _save_png(path: Path, rgb: np.ndarray) -> None:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
