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

from lit_wsss.cams import (
    DEFAULT_BG_THRESHOLD,
    DEFAULT_CAM_SCALES,
    HIGH_RES_RULES,
    CAMRecord,
    cams_to_mask,
    multiscale_cams,
)
from lit_wsss.losses.common import multilabel_loss
from lit_wsss.metrics import ThresholdSweep
from lit_wsss.scores import sweep_summary

#: protocol.md §5: the sweep logged next to the fixed 0.15.
DEFAULT_SWEEP_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 13))


class CAMHeadMixin:
    """A 1x1 classifier (no bias) on the last backbone level, used both after GAP (logits) and densely (CAMs).

    Args:
        cam_scales: inference scales, each batched with its horizontal flip (protocol.md §4).
        cam_bg_threshold: constant background plane used to turn CAMs into the validation mask (IRN's
            ``cam_eval_thres`` = 0.15, protocol.md §5): the headline number, logged as ``val/mIoU``.
        cam_sweep_thresholds: background thresholds also scored in validation (protocol.md §5: a sweep
            0.05..0.60 is logged, IRN-style numbers are reported at 0.15). The best of them is logged as
            ``val/mIoU_oracle``: chosen on the evaluation masks, so optimistic (pitfall P9).
        cam_high_res: how the full-resolution CAM is sized (:data:`lit_wsss.cams.HIGH_RES_RULES`); ``None`` is
            the method's own rule (``high_res_rule``). The GSLM driver sets ``full`` for its GLM, whose
            official export resizes straight to the image size (issue 13).
        **kwargs: passed to :class:`~lit_wsss.modules.base.WSSSModule`.
    """

    backbone: nn.Module
    classifier: nn.Conv2d
    hparams: Any
    #: How the background is decided (protocol.md §5 table; the IR-label stage reads it from the CAM manifest):
    #: ``constant`` = a constant plane on max-normalised foreground CAMs (IRN), ``explicit`` = the method
    #: exports its own background map ``bg`` and masks are a plain argmax (SIPE).
    background_convention: str = "constant"
    #: The method's rule for sizing ``high_res`` in its official CAM export: ``padded`` (IRN ``make_cam.py``:
    #: resize to the next multiple of 16, then crop) or ``full`` (straight to ``H x W``: VWE, GSLM, SLAMs-R,
    #: and SIPE / CPN, whose own loops also resize to the image size).
    high_res_rule: str = "padded"
    #: False for methods whose ``infer_cams`` has its own loop with a fixed rule (SIPE, CPN).
    high_res_configurable: bool = True

    def __init__(
        self,
        cam_scales: Sequence[float] = DEFAULT_CAM_SCALES,
        cam_bg_threshold: float = DEFAULT_BG_THRESHOLD,
        cam_sweep_thresholds: Sequence[float] = DEFAULT_SWEEP_THRESHOLDS,
        cam_high_res: str | None = None,
        **kwargs: Any,
    ) -> None:
        if cam_high_res is not None and cam_high_res not in HIGH_RES_RULES:
            raise ValueError(f"cam_high_res must be one of {list(HIGH_RES_RULES)} or null, got {cam_high_res!r}")
        if cam_high_res not in (None, self.high_res_rule) and not self.high_res_configurable:
            raise ValueError(f"{type(self).__name__} sizes its CAMs by its own rule ({self.high_res_rule!r}); "
                             f"cam_high_res={cam_high_res!r} is not available for it")
        super().__init__(**kwargs)
        self.val_sweep_summary: dict[str, Any] | None = None

    @property
    def cam_high_res_rule(self) -> str:
        """The rule in force: the ``cam_high_res`` argument, else the method's ``high_res_rule``."""
        return self.hparams.get("cam_high_res") or self.high_res_rule

    def configure_metrics(self) -> None:
        super().configure_metrics()  # type: ignore[misc]
        sweep = [float(t) for t in self.hparams.cam_sweep_thresholds]
        fixed = float(self.hparams.cam_bg_threshold)
        # the fixed threshold is scored too, as an extra last plane when it is not in the sweep
        self.val_sweep = ThresholdSweep(self.hparams.num_classes, sweep + ([] if fixed in sweep else [fixed]))

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
        return {"cls": multilabel_loss(self(batch["image"]), batch["labels"])}

    @torch.no_grad()
    def infer_cams(self, image: Tensor, labels: Tensor) -> CAMRecord:
        """Multi-scale + flip CAMs of one image for the classes with ``labels == 1``."""
        keys = torch.nonzero(labels > 0.5).flatten()
        return multiscale_cams(lambda x: self.cams(self.features(x)), image, keys, self.hparams.cam_scales,
                               high_res=self.cam_high_res_rule)

    def media_record(self, image: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """For the validation panels (``CAMMedia``): the CAMs of the labelled classes and the decoded mask."""
        record = self.infer_cams(image, labels)
        prediction = cams_to_mask(record["high_res"], record["keys"], self.hparams.cam_bg_threshold, record.get("bg"))
        return {"high_res": record["high_res"], "keys": record["keys"], "prediction": prediction}

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
            "high_res_rule": self.cam_high_res_rule,
            "background_convention": self.background_convention,
            "bg_threshold": self.hparams.cam_bg_threshold,
            "threshold_chosen": "fixed",
            "sweep_thresholds": list(self.hparams.cam_sweep_thresholds),
            "crf": False,
            "image_labels": "ground truth",
        }
        if self.background_convention == "explicit":
            record["cam"].update(bg_threshold=None, threshold_chosen="none: argmax over the exported bg map",
                                 sweep_thresholds=[])
        return record

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """CAM mIoU at the constant background threshold, from the ground-truth image labels (protocol.md §5)."""
        for image, labels, mask, (height, width) in zip(
            batch["image"], batch["labels"], batch["mask"], batch["size"].tolist()
        ):
            # Batches of several images are padded; CAMs are computed on each image's own extent.
            record = self.infer_cams(image[:, :height, :width], labels)
            bg = record.get("bg")  # type: ignore[misc]
            prediction = cams_to_mask(record["high_res"], record["keys"], self.hparams.cam_bg_threshold, bg)
            self.val_miou.update(prediction[None], mask[None, :height, :width].long())
            if bg is None:  # a threshold sweep means nothing for a method with its own background
                self.val_sweep.update(record["high_res"], record["keys"], mask[:height, :width])
        self.log("val/mIoU", self.val_miou, prog_bar=True, batch_size=batch["image"].shape[0])

    def on_validation_epoch_end(self) -> None:
        """Scores of the threshold sweep (a collective call: every rank computes the same reduced matrices)."""
        if self.background_convention == "explicit":  # nothing was swept (same on every rank: no collective)
            self.val_sweep_summary = None
            return
        reduced = self.val_sweep.compute()
        self.val_sweep.reset()
        sweep = [float(t) for t in self.hparams.cam_sweep_thresholds]
        summary = sweep_summary(reduced["confusion"].cpu().numpy(), sweep, float(self.hparams.cam_bg_threshold))
        datamodule = getattr(self.trainer, "datamodule", None)
        data = datamodule.protocol() if hasattr(datamodule, "protocol") else {}
        summary.update(
            num_images=int(reduced["num_images"]),
            num_classes=self.hparams.num_classes,
            class_names=["background", *self.class_names()],
            cams=f"{type(self).__name__} validation CAMs, epoch {self.current_epoch}",
            ground_truth=f"{data.get('val_list', 'val')} / {data.get('ground_truth', 'masks')}",
        )
        self.val_sweep_summary = summary
        if summary["best"]["miou"] is not None:
            self.log("val/mIoU_oracle", float(summary["best"]["miou"]), sync_dist=True)
            self.log("val/threshold_oracle", float(summary["best"]["threshold"]), sync_dist=True)
