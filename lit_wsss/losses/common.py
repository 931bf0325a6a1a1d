"""Small helpers shared by the method maths in :mod:`lit_wsss.losses`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lit_wsss.precision import float32


@float32
def multilabel_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """IRN's classification loss (``step/train_cam.py``): multi-label soft margin, mean over batch and classes,
    in float32 under mixed precision (:mod:`lit_wsss.precision`)."""
    return F.multilabel_soft_margin_loss(logits, labels)


def as_matrix(weight: Tensor, name: str) -> Tensor:
    """A 1x1 conv weight ``(O, I, 1, 1)`` or a matrix ``(O, I)`` as ``(O, I)``; ``name`` is used in errors."""
    if weight.dim() == 4 and tuple(weight.shape[-2:]) == (1, 1):
        return weight[:, :, 0, 0]
    if weight.dim() == 2:
        return weight
    raise ValueError(
        f"{name} must be a 1x1 conv weight (O, I, 1, 1) or a matrix (O, I), got {tuple(weight.shape)}"
    )
