"""The segmentation stage's loss (issue 14): pixel cross-entropy on pseudo labels, 255 ignored.

The DeepLab-v2 protocol (kazuto1011/deeplab-pytorch ``configs/voc12.yaml``) scores the loss at the logits'
resolution, the labels resized by nearest neighbour; on small CPU crops the logits are too coarse for that, so
the alternative upsamples the logits bilinearly to the labels' size instead.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lit_wsss.io import IGNORE_INDEX
from lit_wsss.precision import float32

LOSS_RESOLUTIONS = ("logits", "input")


@float32
def segmentation_loss(logits: Tensor, labels: Tensor, resolution: str = "logits") -> Tensor:
    """Mean cross-entropy of ``logits`` ``(B, C+1, h, w)`` on ``labels`` ``(B, H, W)`` (int64, 255 ignored).

    Args:
        resolution: ``logits`` (the protocol: labels resized to ``h x w`` by nearest neighbour) or ``input``
            (logits bilinearly upsampled to ``H x W``).
    """
    if resolution not in LOSS_RESOLUTIONS:
        raise ValueError(f"unknown loss resolution {resolution!r}; expected one of {LOSS_RESOLUTIONS}")
    if resolution == "logits":
        labels = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
    else:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


__all__ = ["LOSS_RESOLUTIONS", "segmentation_loss"]
