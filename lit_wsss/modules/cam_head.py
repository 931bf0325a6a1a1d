"""``CAMHeadMixin``: the classifier head, CAMs and CAM validation shared by every CAM method.

Reproduces IRN ``net/resnet50_cam.py`` (``Net`` for training, ``CAM`` for inference) and the CAM
evaluation of ``step/eval_cam.py`` (../shared/methods/protocol.md §3-§5). Place it first in the MRO:
``class CPN(CAMHeadMixin, WSSSModule)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_wsss.cams import DEFAULT_BG_THRESHOLD, DEFAULT_CAM_SCALES, CAMRecord, cams_to_mask, multiscale_cams


class CAMHeadMixin:
    """A 1x1 classifier (no bias) on the last backbone level, used both after GAP (logits) and densely (CAMs).

    Args:
        cam_scales: inference scales, each batched with its horizontal flip (protocol.md §4).
        cam_bg_threshold: constant background plane used to turn CAMs into the validation mask (IRN's
            ``cam_eval_thres`` = 0.15, protocol.md §5).
        **kwargs: passed to :class:`~lit_wsss.modules.base.WSSSModule`.
    """

    backbone: nn.Module
    classifier: nn.Conv2d
    hparams: Any

    def __init__(
        self,
        cam_scales: Sequence[float] = DEFAULT_CAM_SCALES,
        cam_bg_threshold: float = DEFAULT_BG_THRESHOLD,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)

    def configure_heads(self) -> None:
        self.classifier = nn.Conv2d(self.backbone.out_channels, self.hparams.num_classes, 1, bias=False)

    def features(self, image: Tensor) -> Tensor:
        """Last backbone level, the map CAMs are computed on."""
        return self.backbone(image)[-1]

    def logits(self, features: Tensor) -> Tensor:
        """Global average pooling, then the classifier: ``(B, C)``."""
        return self.classifier(features.mean(dim=(2, 3), keepdim=True)).flatten(1)

    def cams(self, features: Tensor) -> Tensor:
        """``ReLU(W * features)``: the classifier applied at every position, ``(B, C, h, w)``."""
        return F.relu(self.classifier(features))

    def forward(self, image: Tensor) -> Tensor:
        return self.logits(self.features(image))

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Multi-label soft-margin loss (mean over batch and classes), IRN ``step/train_cam.py``."""
        return {"cls": F.multilabel_soft_margin_loss(self(batch["image"]), batch["labels"])}

    @torch.no_grad()
    def infer_cams(self, image: Tensor, labels: Tensor) -> CAMRecord:
        """Multi-scale + flip CAMs of one image for the classes with ``labels == 1``."""
        keys = torch.nonzero(labels > 0.5).flatten()
        return multiscale_cams(lambda x: self.cams(self.features(x)), image, keys, self.hparams.cam_scales)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """CAM records (``image_id``, ``keys``, ``cam``, ``high_res``) of the labelled classes, one per image."""
        records = []
        for image, labels, image_id, (height, width) in zip(
            batch["image"], batch["labels"], batch["image_id"], batch["size"].tolist()
        ):
            records.append({"image_id": image_id, **self.infer_cams(image[:, :height, :width], labels)})
        return records

    def protocol(self) -> dict[str, Any]:
        """The base record plus how CAMs are inferred and scored."""
        record = super().protocol()  # type: ignore[misc]
        record["cam"] = {
            "scales": list(self.hparams.cam_scales),
            "flip": True,
            "normalisation": "per-class max + 1e-5",
            "resolution": "original image size (high_res); ceil(H/4) x ceil(W/4) (strided)",
            "bg_threshold": self.hparams.cam_bg_threshold,
            "threshold_chosen": "fixed",
            "crf": False,
            "image_labels": "ground truth",
        }
        return record

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """CAM mIoU at the constant background threshold, from the ground-truth image labels (protocol.md §5)."""
        for image, labels, mask, (height, width) in zip(
            batch["image"], batch["labels"], batch["mask"], batch["size"].tolist()
        ):
            # Batches of several images are padded; CAMs are computed on each image's own extent.
            record = self.infer_cams(image[:, :height, :width], labels)
            prediction = cams_to_mask(record["high_res"], record["keys"], self.hparams.cam_bg_threshold)
            self.val_miou.update(prediction[None], mask[None, :height, :width].long())
        self.log("val/mIoU", self.val_miou, prog_bar=True, batch_size=batch["image"].shape[0])
