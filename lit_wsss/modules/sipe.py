"""SIPE: Self-supervised Image-specific Prototype Exploration.

Paper: Chen, Yang, Lai, Xie, "Self-supervised Image-specific Prototype Exploration for Weakly Supervised
Semantic Segmentation", CVPR 2022 (arXiv:2203.02909). Official code: chenqi1126/SIPE
(``network/resnet50_SIPE.py``, ``train_resnet50_SIPE.py``, ``make_cam.py``). Spec:
../shared/methods/sipe.md.

Unique here: four 1x1 side convs whose L2-normalised outputs form the hierarchical features; per image,
structure-aware seeds (soft IoU of feature correlation and the general CAM with a background channel),
prototypes pooled over the seeds and the image-specific CAM (IS-CAM) with its own background; the GSC
loss between the general CAM and the IS-CAM. The maths are pure functions in :mod:`lit_wsss.losses.sipe`.
At inference the IS-CAM is exported with an explicit ``bg`` map and scored by a plain argmax (no
threshold, sipe.md §5.2, pitfall S10).

Deviations from the official code: conv1..layer2 get ``requires_grad=False`` instead of a ``.detach()``
(same gradients, DDP-safe); the soft IoU is a batched matmul instead of a ``(B, 21, hw, hw)`` broadcast
(S16, identical values); rescaling of the inference scales as in :func:`lit_wsss.cams.scaled_flip_pairs`;
the schedule length is Lightning's ``estimated_stepping_batches``. The in-training validation every 500
steps on VOC ``train`` (S12, which picks ``best.pth`` on the evaluation masks) is not reproduced: validation
runs on the data config's ``val_list`` and the exported model is the final one, as ``make_cam.py`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_wsss.cams import CAMRecord, sum_over_scales
from lit_wsss.losses.common import multilabel_loss
from lit_wsss.losses.sipe import (
    SIPE_EPS,
    general_cam_with_background,
    gsc_loss,
    hierarchical_features,
    is_cam,
    prototypes,
    structure_aware_seeds,
    valid_mask,
)
from lit_wsss.modules.base import WSSSModule
from lit_wsss.modules.cam_head import CAMHeadMixin


class SIPE(CAMHeadMixin, WSSSModule):
    """SIPE on the shared CAM head (sipe.md §2-§5).

    Training needs the in-image mask of each crop: use the data transform ``irn_cls_valid`` (the configs in
    ``experiments/methods/sipe.yaml`` set it) and ``gradient_clip_val: 1.0`` (global norm, S8).

    Args:
        side_channels: output widths of the 1x1 side convs on the last four backbone levels (ResNet-50:
            layer1..layer4, 256/512/1024/2048 -> 128/128/256/256, 768 in total).
        **kwargs: :class:`CAMHeadMixin` / :class:`WSSSModule` arguments. The defaults already are SIPE's
            recipe (§4): ResNet-50 OS16, frozen stem..layer2, lr 0.1 (new layers x10 = 1.0), wd 1e-4, poly 0.9,
            IRN's momentum quirk; scales (1.0, 0.5, 1.5, 2.0) + flip. ``cam_bg_threshold`` and
            ``cam_sweep_thresholds`` are unused: the IS-CAM brings its own background.

    Gradient routing (§3, S7): side convs see detached backbone features, so they learn only from GSC through
    the IS-CAM; the classifier and layer3/layer4 learn from L_cls and from GSC through Mh; seeds carry none.
    """

    high_res_rule = "full"  # infer_cams sums the scales straight at (H, W)
    high_res_configurable = False

    background_convention = "explicit"

    def __init__(self, side_channels: Sequence[int] = (128, 128, 256, 256), **kwargs: Any) -> None:
        super().__init__(**kwargs)

    def configure_heads(self) -> None:
        super().configure_heads()
        widths = [int(c) for c in self.hparams.side_channels]
        levels = self.backbone.level_channels[-4:]
        if len(widths) != 4 or len(levels) != 4:
            raise ValueError(f"SIPE needs 4 side widths and a backbone with >= 4 levels, got {widths} and "
                             f"{self.backbone.level_channels}")
        # attribute names = the official ``side1..side4`` so official checkpoints load key for key
        for index, (in_channels, width) in enumerate(zip(levels, widths, strict=True), start=1):
            setattr(self, f"side{index}", nn.Conv2d(in_channels, width, 1, bias=False))

    def hierarchical(self, levels: list[Tensor]) -> Tensor:
        """F = cat of the normalised side outputs at the third side level's size (§2); inputs detached (S7)."""
        sides = [self.side1, self.side2, self.side3, self.side4]
        return hierarchical_features([side(x.detach()) for side, x in zip(sides, levels[-4:], strict=True)])

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """L_cls + L_GSC (§3): seeds from x4 (S1), prototypes and IS-CAM from the hierarchical features."""
        if "valid" not in batch:
            raise ValueError("SIPE needs the in-image mask of each crop: set data.init_args.train_transform to "
                             "'irn_cls_valid' (see experiments/methods/sipe.yaml)")
        labels = batch["labels"]
        levels = self.backbone(batch["image"])
        deep = levels[-1]
        cam = self.classifier(deep)
        valid = valid_mask(torch.stack(list(batch["valid"])).to(cam.device), labels, tuple(cam.shape[-2:]))
        mh = general_cam_with_background(cam, valid)
        seeds, _ = structure_aware_seeds(mh, valid, deep)
        features = self.hierarchical(levels)
        specific = is_cam(features, prototypes(seeds, features))
        # GAP(classifier(x4)) == classifier(GAP(x4)): the classifier is linear without bias
        score = cam.mean(dim=(2, 3))
        return {"cls": multilabel_loss(score, labels), "gsc": gsc_loss(mh, specific)}

    @torch.no_grad()
    def infer_cams(self, image: Tensor, labels: Tensor) -> CAMRecord:
        """Multi-scale IS-CAM of one image (§5.1): raw-logit flip fusion, seeds from the fused ``F`` (S1, S9).

        Returns the common record plus ``bg`` (H, W): ``high_res`` / ``bg`` are the present classes' and the
        background's IS-CAM summed over scales at (H, W) and divided by their max + 1e-5; ``cam`` is
        ``high_res`` bilinearly downsampled to ``ceil(H/4) x ceil(W/4)`` (S13: no strided export).
        """
        if image.dim() == 4:
            image = image[0]
        height, width = image.shape[-2:]
        keys = torch.nonzero(labels > 0.5).flatten()
        channels = torch.cat([keys.new_zeros(1), keys + 1])  # background + present classes
        present = torch.zeros(self.hparams.num_classes + 1, device=image.device)
        present[channels] = 1.0  # y' = (1, y)

        def image_specific_cam(pair: Tensor) -> Tensor:
            levels = self.backbone(pair)
            cam = self.classifier(levels[-1])
            features = self.hierarchical(levels)
            fused_cam = (cam[0] + cam[1].flip(-1))[None]  # raw logits, ReLU afterwards (S9)
            fused_features = (features[0] + features[1].flip(-1))[None]
            mh = general_cam_with_background(fused_cam)
            seeds, _ = structure_aware_seeds(mh, present.view(1, -1, 1, 1), fused_features)
            return is_cam(fused_features, prototypes(seeds, fused_features))[0, channels]

        (total,) = sum_over_scales(image_specific_cam, image, self.hparams.cam_scales, [(height, width)])
        total /= total.flatten(1).amax(1).view(-1, 1, 1) + SIPE_EPS
        strided = F.interpolate(total[None, 1:], (math.ceil(height / 4), math.ceil(width / 4)),
                                mode="bilinear", align_corners=False)[0]
        return CAMRecord(keys=keys, cam=strided, high_res=total[1:], bg=total[0])

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        record["cam"].update(
            kind="IS-CAM (sipe.md §5.1)",
            resolution="original image size (high_res, bg); cam = bilinear downsample of high_res to "
                       "ceil(H/4) x ceil(W/4) (sipe.md S13)",
        )
        return record
