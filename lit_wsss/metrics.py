"""Segmentation metrics that stay correct under DDP.

The protocol (../shared/methods/protocol.md §5) accumulates ONE confusion matrix over every pixel of every
image (ground-truth 255 ignored) and takes the nan-mean of the per-class IoUs. Under DDP the matrices are
summed across ranks before the IoU is computed; per-rank mIoUs are never averaged (IoU is not additive).

Here too: the DDP metric of the one-pass background-threshold sweep of CAMs (:class:`ThresholdSweep`, used by the
CAM head in validation and summed like the confusion matrix above); the sweep itself and every numpy score of a
confusion matrix live in :mod:`lit_wsss.scores` (no torch), which ``eval-cam`` imports.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassConfusionMatrix

from lit_wsss.io import IGNORE_INDEX
from lit_wsss.scores import iou_per_class, sweep_confusions


def iou_from_confusion(confusion: Tensor) -> Tensor:
    """Per-class IoU (float64, ``nan`` for a class absent from ground truth and prediction) of a confusion
    matrix ``C[ground_truth, prediction]`` on its device: :func:`lit_wsss.scores.iou_per_class`."""
    return torch.from_numpy(iou_per_class(confusion.detach().cpu().numpy())).to(confusion.device)


def miou_from_confusion(confusion: Tensor) -> Tensor:
    """Dataset-level mIoU: nan-mean of :func:`iou_from_confusion`."""
    return torch.nanmean(iou_from_confusion(confusion))


class MeanIoU(MulticlassConfusionMatrix):
    """Confusion-matrix metric whose ``compute()`` is the protocol mIoU.

    ``num_classes`` counts background, so VOC uses 21. The state is torchmetrics' confusion matrix with
    ``dist_reduce_fx="sum"``, so logging this object with ``self.log`` reduces it across ranks exactly.
    Input validation is switched off for speed (../shared/stack.md §3d); callers validate ground truth on
    load instead.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(num_classes=num_classes, ignore_index=ignore_index, validate_args=False)

    def compute(self) -> Tensor:  # noqa: D102 - documented on the class
        return miou_from_confusion(self.confmat)

    def iou(self) -> Tensor:
        """Per-class IoU of the accumulated (already synced, if called after ``compute``) matrix."""
        return iou_from_confusion(self.confmat)


class ThresholdSweep(Metric):
    """One confusion matrix per background threshold, accumulated in validation and summed across ranks.

    ``update`` takes one image's CAMs (:func:`sweep_confusions`); ``compute`` returns the ``(T, C+1, C+1)``
    matrices and the image count (reduced over ranks under DDP), ready for :func:`sweep_summary`.
    """

    full_state_update = False

    def __init__(self, num_classes: int, thresholds: Sequence[float]) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.thresholds = [float(t) for t in thresholds]
        size = num_classes + 1
        self.add_state(
            "confusion", default=torch.zeros(len(self.thresholds), size, size, dtype=torch.long),
            dist_reduce_fx="sum",
        )
        self.add_state("num_images", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, high_res: torch.Tensor, keys: torch.Tensor, target: torch.Tensor) -> None:
        matrices = sweep_confusions(
            high_res.detach().cpu(), keys.detach().cpu(), target.detach().cpu(), self.thresholds, self.num_classes
        )
        self.confusion += torch.from_numpy(matrices).to(self.confusion.device)
        self.num_images += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {"confusion": self.confusion.clone(), "num_images": self.num_images.clone()}
