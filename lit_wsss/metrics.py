"""Segmentation metrics that stay correct under DDP.

The protocol (../shared/methods/protocol.md §5) accumulates ONE confusion matrix over every pixel of every
image (ground-truth 255 ignored) and takes the nan-mean of the per-class IoUs. Under DDP the matrices are
summed across ranks before the IoU is computed; per-rank mIoUs are never averaged (IoU is not additive).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

IGNORE_INDEX = 255


def iou_from_confusion(confusion: Tensor) -> Tensor:
    """Per-class IoU from a confusion matrix ``C[ground_truth, prediction]``.

    ``IoU_c = C_cc / (sum_p C_cp + sum_g C_gc - C_cc)``; a class that is absent from both the ground truth
    and the prediction has IoU ``nan`` so that :func:`torch.nanmean` skips it (protocol.md §5).
    """
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    return torch.where(union > 0, true_positive / union.clamp_min(1), torch.full_like(union, float("nan")))


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
