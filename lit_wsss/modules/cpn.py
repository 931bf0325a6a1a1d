"""CPN: Complementary Patch Network.

Paper: Zhang, Gu, Zhang, Dai, "Complementary Patch for Weakly Supervised Semantic Segmentation", ICCV 2021
(arXiv:2108.03852). Official code: Ferenas/CPN (now SII-Ferenas/CPN; ``network/resnet38_CPN.py``,
``train_cpn.py``, ``infer_cam.py``). Spec: ../shared/methods/cpn.md.

Unique here: a triplet forward over the image and its complementary pair (x1 = x*m, x2 = x*(1-m), the
mask drawn by the data transform ``cpn_superpixel``/``cpn_grid``); a 21-channel fc8 whose CAM is refined by
PCM + PRCM on the backbone's conv4/conv5 taps; the classification (+ min-pooling), CP, CPR and CPCR (OHEM)
losses. The maths are pure functions in :mod:`lit_wsss.losses.cpn`. The exported seed is the multi-scale
refined CAM, min-max normalised; the background is a constant plane chosen by a sweep (C11).

Deviations from the official code: the three passes run as one batch of 3B (BatchNorm is frozen, so this
changes nothing but speed; dropout masks are drawn independently either way); frozen layers have
``requires_grad=False`` and never enter the optimizer (the official groups hold them without gradient);
the exported maps are NOT halved (the common format is unit scale: CPN's sweep t in [0.20, 0.59] is
tau = 2t in [0.40, 1.18] here, pitfall C10) and negative values the official normalisation can leave at
the per-class minimum are clamped to 0 (no effect on any threshold >= 0); the stride-4 ``cam`` is the
full-resolution map bilinearly downsampled (cpn.md §7: IRN needs one, the official repo has none);
multi-scale rescaling as in :func:`lit_wsss.cams.scaled_flip_pairs`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_wsss.backbones import FrozenStatsBatchNorm2d
from lit_wsss.cams import CAMRecord, sum_over_scales
from lit_wsss.datamodules.complementary import split_by_keep_mask
from lit_wsss.losses.cpn import CPN_EPS, cpn_losses, refined_cam, upsample
from lit_wsss.modules.base import WSSSModule
from lit_wsss.modules.cam_head import CAMHeadMixin

#: CPN's background sweep 0.20..0.59 on halved maps, as unit-scale thresholds (cpn.md §7, C10).
CPN_SWEEP_THRESHOLDS: tuple[float, ...] = tuple(round(0.40 + 0.02 * i, 2) for i in range(40))


class CPN(CAMHeadMixin, WSSSModule):
    """CPN on the shared CAM head (cpn.md §3-§7).

    Training needs the complementary-patch mask of each crop: data ``train_transform: cpn_superpixel``
    (or ``cpn_grid``), set by ``experiments/methods/cpn.yaml``.

    Args:
        low_channels, high_channels: widths of f8_3 (on the conv4 tap) and f8_4 (on the conv5 tap): 64, 128.
        head_channels: width of f9/f10 (192).
        prcm_key_transpose: ``False`` reproduces the official PRCM key (a reshape that scrambles classes and
            channels, C7); ``True`` uses the transpose the equation intends.
        ohem_ratio: share of the ``K*H*W`` CPCR errors kept per image (0.2, C6).
        min_pool_fraction: share of pixels in the min-pooling term of L_cls (1/4).
        fc8_dropout: Dropout2d before fc8 (0.5).
        frozen_bn_affine: freeze gamma/beta of every backbone BatchNorm (CPN freezes all BN, C9).
        backbone, pretrained, lr, weight_decay, frozen_levels: CPN's recipe by default: ResNet-38d (its
            ImageNet weights must be given as a converted file: ``pretrained=<path>``), lr 0.01 (new layers
            x10), wd 5e-4, conv1a/b2* frozen. ``resnet50`` ("CPN-R50", a non-official ablation) uses the
            layer2/layer3 outputs as taps (cpn.md §2).
        cam_bg_threshold: no official fixed value exists (CPN picks the best of its sweep, reported as
            ``val/mIoU_oracle``); 0.8 = 0.40 on CPN's halved maps, the middle of its sweep.
        cam_sweep_thresholds: CPN's sweep in unit scale (0.40..1.18, step 0.02).
        **kwargs: other :class:`CAMHeadMixin` / :class:`WSSSModule` arguments.
    """

    high_res_rule = "full"  # infer_cams sums the scales straight at (H, W)
    high_res_configurable = False

    def __init__(
        self,
        low_channels: int = 64,
        high_channels: int = 128,
        head_channels: int = 192,
        prcm_key_transpose: bool = False,
        ohem_ratio: float = 0.2,
        min_pool_fraction: float = 0.25,
        fc8_dropout: float = 0.5,
        frozen_bn_affine: bool = True,
        backbone: str = "resnet38d",
        pretrained: str | None = "imagenet",
        lr: float = 0.01,
        weight_decay: float = 5e-4,
        frozen_levels: int = 1,
        cam_scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0),
        cam_bg_threshold: float = 0.8,
        cam_sweep_thresholds: Sequence[float] = CPN_SWEEP_THRESHOLDS,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            backbone=backbone, pretrained=pretrained, lr=lr, weight_decay=weight_decay, frozen_levels=frozen_levels,
            cam_scales=cam_scales, cam_bg_threshold=cam_bg_threshold, cam_sweep_thresholds=cam_sweep_thresholds,
            **kwargs,
        )
        if frozen_bn_affine:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.requires_grad_(False)
        if not isinstance(next(m for m in self.backbone.modules() if isinstance(m, nn.BatchNorm2d)),
                          FrozenStatsBatchNorm2d):
            raise ValueError("CPN keeps every BatchNorm in eval mode (C9): use frozen_bn_stats=True")

    def configure_heads(self) -> None:
        hp = self.hparams
        channels = self.backbone.level_channels
        self.dropout = nn.Dropout2d(hp.fc8_dropout)
        # names = the official ones (fc8 is ``classifier``) so official checkpoints load key for key
        self.classifier = nn.Conv2d(channels[-1], hp.num_classes + 1, 1, bias=False)  # fc8, channel 0 = bg
        self.f8_3 = nn.Conv2d(channels[-3], hp.low_channels, 1, bias=False)
        self.f8_4 = nn.Conv2d(channels[-2], hp.high_channels, 1, bias=False)
        head_in = 3 + hp.low_channels + hp.high_channels
        self.f9 = nn.Conv2d(head_in, hp.head_channels, 1, bias=False)
        self.f10 = nn.Conv2d(head_in, hp.head_channels, 1, bias=False)
        nn.init.xavier_uniform_(self.classifier.weight)
        nn.init.kaiming_normal_(self.f8_3.weight)
        nn.init.kaiming_normal_(self.f8_4.weight)
        nn.init.xavier_uniform_(self.f9.weight, gain=4)
        nn.init.xavier_uniform_(self.f10.weight, gain=4)

    def head(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Raw and refined CAMs ``(B, C+1, H, W)`` at the input size (align_corners=True, §3)."""
        levels = self.backbone(image)
        conv4, conv5, conv6 = levels[-3:]
        cam = self.classifier(self.dropout(conv6))
        size = tuple(cam.shape[-2:])
        taps = []
        for conv, tap in ((self.f8_3, conv4), (self.f8_4, conv5)):
            tap = tap.detach()  # gradient reaches f8_3/f8_4 only through the refined CAM (§3)
            if tuple(tap.shape[-2:]) != size:  # CPN-R50 / EfficientNet: the /8 tap to the /16 CAM grid
                tap = F.interpolate(tap, size, mode="bilinear", align_corners=False)
            taps.append(conv(tap))
        refined = refined_cam(cam, image, *taps, self.f9, self.f10,
                              key_transpose=self.hparams.prcm_key_transpose)
        full = tuple(image.shape[-2:])
        return upsample(cam, full), upsample(refined, full)

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The triplet forward over (x, x1, x2) and the four loss terms of §5 (all weights 1)."""
        if "patch_keep" not in batch:
            raise ValueError("CPN needs the complementary-patch mask of each crop: set data.init_args."
                             "train_transform to 'cpn_superpixel' or 'cpn_grid' (see experiments/methods/cpn.yaml)")
        image = batch["image"]
        keep = torch.stack(list(batch["patch_keep"])).to(image.device)[:, None]
        rho = torch.as_tensor(batch["rho"], dtype=image.dtype, device=image.device)
        x1, x2 = split_by_keep_mask(image, keep)
        cams, refined = self.head(torch.cat([image, x1, x2]))
        return cpn_losses(cams.chunk(3), refined.chunk(3), rho, batch["labels"],
                          ohem_ratio=self.hparams.ohem_ratio, min_pool_fraction=self.hparams.min_pool_fraction)

    def forward(self, image: Tensor) -> Tensor:
        """Foreground logits ``(B, C)``: GAP of the raw CAM's channels 1..C (§5)."""
        return self.classifier(self.backbone(image)[-1].mean(dim=(2, 3), keepdim=True)).flatten(1)[:, 1:]

    @torch.no_grad()
    def infer_cams(self, image: Tensor, labels: Tensor) -> CAMRecord:
        """``infer_cam.py`` (§7): refined CAMs of 4 scales x flip summed, min-max normalised per class.

        Each pass's refined CAM (channels 1..C, present classes) is resized to (H, W) (align_corners=False)
        and un-flipped; the sum is ReLU'd; per class, values below min + 1e-5 become 0 and the map becomes
        ``(x - min - 1e-5) / (max - min + 1e-5)`` (min/max of the sum). Not halved (unit scale, C10).
        """
        if image.dim() == 4:
            image = image[0]
        height, width = image.shape[-2:]
        keys = torch.nonzero(labels > 0.5).flatten()

        def refined_flip_sum(pair: Tensor) -> Tensor:
            refined = self.head(pair)[1][:, keys + 1]
            return refined[0] + refined[1].flip(-1)

        # the official code resizes each pass before un-flipping; resizing is linear and flip-symmetric
        (total,) = sum_over_scales(refined_flip_sum, image, self.hparams.cam_scales, [(height, width)])
        total = F.relu(total)
        low = total.flatten(1).amin(1).view(-1, 1, 1)
        high = total.flatten(1).amax(1).view(-1, 1, 1)
        total = torch.where(total < low + CPN_EPS, torch.zeros_like(total), total)
        high_res = ((total - low - CPN_EPS) / (high - low + CPN_EPS)).clamp_min(0)
        strided = F.interpolate(high_res[None], (math.ceil(height / 4), math.ceil(width / 4)), mode="bilinear",
                                align_corners=False)[0]
        return CAMRecord(keys=keys, cam=strided, high_res=high_res)

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        record["cam"].update(
            kind="refined CAM (PCM + PRCM), cpn.md §7",
            normalisation="per-class min-max of the sum over scales (unit scale: CPN's halving undone)",
            resolution="original image size (high_res); cam = bilinear downsample of high_res to "
                       "ceil(H/4) x ceil(W/4)",
            threshold_chosen="fixed (val/mIoU); CPN's own protocol reports the best of the sweep "
                             "(val/mIoU_oracle, chosen on the evaluation masks)",
        )
        record["cpn"] = {"prcm_key_transpose": self.hparams.prcm_key_transpose,
                         "ohem_ratio": self.hparams.ohem_ratio, "min_pool_fraction": self.hparams.min_pool_fraction}
        return record
