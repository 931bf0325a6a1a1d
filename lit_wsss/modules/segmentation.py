"""DeepLab: the fully supervised segmentation network trained on pseudo labels (the last stage of WSSS).

Papers: Chen, Papandreou, Kokkinos, Murphy, Yuille, "DeepLab: Semantic Image Segmentation with Deep
Convolutional Nets, Atrous Convolution, and Fully Connected CRFs", TPAMI 2018 (arXiv:1606.00915; v2, the
WSSS protocol); Chen et al., "Encoder-Decoder with Atrous Separable Convolution for Semantic Image
Segmentation", ECCV 2018 (arXiv:1802.02611; v3+). No WSSS seed repository ships this stage ("use any
DeepLab"); the recipe defaults follow the common PyTorch DeepLab-v2 VOC setup, kazuto1011/deeplab-pytorch
``configs/voc12.yaml``: crop 321, batch 10 (5 x 2 accumulated there), 20k iterations, lr 2.5e-4 with 10x on
the head, SGD momentum 0.9, weight decay 5e-4, poly 0.9, random scale 0.5-1.5 + flip (data transform
``deeplab``), cross-entropy with 255 ignored, frozen BatchNorm, optional dense CRF (``lit_wsss.refine.crf``).

Training targets are pixel labels of the TRAINING images: a pseudo-label folder (``PseudoLabelWriter``
output) given to the data module as ``seed_dir`` (255 = ignore); validation scores the network on the
ground-truth masks of another split (``val_list``). Prediction writes one palette PNG per image
(``lit_wsss.callbacks.SegmentationWriter``), scored by ``lit-wsss eval-seg``.

Deviations from kazuto1011/deeplab-pytorch: torchvision ResNets (stride on the 3x3 conv, not the first 1x1 of
Caffe's ResNet); no multi-scale (MSC) training: one scale, the loss on labels nearest-downsampled to the logit
size (``loss_resolution="logits"``, kazuto1011's ``resize_labels``) or on bilinearly upsampled logits
(``"input"``); the random scale is continuous in [0.5, 1.5] instead of the set {0.5, 0.75, 1, 1.25, 1.5};
biases of the head at 10x, not 20x; inference adds horizontal flips to MSC's scales (1.0, 0.75, 0.5), rescales
with antialiased bicubic (the CAM methods' :func:`lit_wsss.cams.scaled_flip_pairs`) instead of bilinear, and
fuses by the max of the logits (MSC) or the mean of the probabilities (``inference_fusion``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_wsss.backbones import Backbone, build_backbone
from lit_wsss.cams import scaled_flip_pairs
from lit_wsss.datamodules.transforms import denormalise
from lit_wsss.losses.segmentation import LOSS_RESOLUTIONS, segmentation_loss
from lit_wsss.modules.base import WSSSModule

HEADS = ("deeplabv2", "deeplabv3plus")
FUSIONS = ("max", "mean")
#: Atrous rates by (head, output stride): DeepLab-v2 (6, 12, 18, 24) at OS8, v3+ (6, 12, 18) at OS16; the
#: other strides scale them so that the receptive field in pixels stays the same.
DEFAULT_RATES = {("deeplabv2", 8): (6, 12, 18, 24), ("deeplabv2", 16): (3, 6, 9, 12),
                 ("deeplabv3plus", 16): (6, 12, 18), ("deeplabv3plus", 8): (12, 24, 36)}


class DeepLabV2Head(nn.Module):
    """DeepLab-v2's ASPP: four parallel 3x3 convolutions with dilations ``rates`` straight to the classes,
    summed (the paper's ASPP-L; biases, weights N(0, 0.01) as kazuto1011's ``_ASPP``)."""

    def __init__(self, in_channels: int, num_outputs: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_outputs, 3, padding=rate, dilation=rate, bias=True) for rate in rates
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, levels: list[Tensor]) -> Tensor:
        features = levels[-1]
        return torch.stack([branch(features) for branch in self.branches]).sum(0)


class DeepLabV3PlusHead(nn.Module):
    """DeepLab-v3+: torchvision's ASPP (256 channels, image pooling) on the deepest level, a decoder that
    concatenates a 48-channel projection of the stride-4 level and refines with two 3x3 convolutions."""

    def __init__(self, in_channels: int, low_channels: int, num_outputs: int, rates: Sequence[int]) -> None:
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.aspp = ASPP(in_channels, list(rates), out_channels=256)
        self.project = nn.Sequential(nn.Conv2d(low_channels, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.decoder = nn.Sequential(
            nn.Conv2d(304, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
            nn.Conv2d(256, num_outputs, 1),
        )

    def forward(self, levels: list[Tensor]) -> Tensor:
        low = self.project(levels[1])
        context = F.interpolate(self.aspp(levels[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.decoder(torch.cat([context, low], dim=1))


class DeepLab(WSSSModule):
    """A segmentation network on the shared base (backbone registry, parameter groups, poly, protocol record).

    Args:
        head: ``deeplabv2`` (the WSSS protocol) or ``deeplabv3plus``.
        output_stride: 8 (DeepLab-v2: layer3 and layer4 dilated) or 16 (layer4 dilated) for ResNet-50/101;
            ResNet-18/34 and EfficientNet-Lite0 have 16 only (see :meth:`make_backbone`).
        atrous_rates: default :data:`DEFAULT_RATES` of the head and output stride.
        inference_scales: scales of the image at inference, each with its horizontal flip when
            ``inference_flip`` (kazuto1011's MSC scales 1.0, 0.75, 0.5).
        inference_fusion: ``max`` of the logits (MSC) or ``mean`` of the softmax probabilities.
        val_scales: scales of the in-training validation (one by default: it runs every epoch).
        crf: dense CRF on the probabilities before the argmax at prediction (``lit_wsss.refine.crf``).
        loss_resolution: ``logits`` (labels nearest-downsampled to the logit size, kazuto1011) or ``input``.
        frozen_bn_affine: BatchNorm gamma/beta of the backbone do not train (kazuto1011 freezes BN).
        num_classes, backbone, pretrained, lr, head_lr_mult, weight_decay, momentum, sgd_momentum_quirk,
            frozen_levels: :class:`WSSSModule`; the defaults here are the DeepLab recipe (ResNet-101 ImageNet,
            lr 2.5e-4, x10 head, wd 5e-4, momentum 0.9 without IRN's quirk, no frozen level).
        **kwargs: other :class:`WSSSModule` arguments.
    """

    def __init__(
        self,
        head: str = "deeplabv2",
        output_stride: int = 8,
        atrous_rates: Sequence[int] | None = None,
        inference_scales: Sequence[float] = (1.0, 0.75, 0.5),
        inference_flip: bool = True,
        inference_fusion: str = "max",
        val_scales: Sequence[float] = (1.0,),
        crf: bool = False,
        loss_resolution: str = "logits",
        frozen_bn_affine: bool = True,
        num_classes: int = 20,
        backbone: str = "resnet101",
        pretrained: str | None = "imagenet",
        lr: float = 2.5e-4,
        head_lr_mult: float = 10.0,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        sgd_momentum_quirk: bool = False,
        frozen_levels: int = 0,
        **kwargs: Any,
    ) -> None:
        for name, value, valid in (("head", head, HEADS), ("inference_fusion", inference_fusion, FUSIONS),
                                   ("loss_resolution", loss_resolution, LOSS_RESOLUTIONS)):
            if value not in valid:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(valid)}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        if not inference_scales or not val_scales:
            raise ValueError("inference_scales and val_scales need at least one scale")
        super().__init__(num_classes=num_classes, backbone=backbone, pretrained=pretrained, lr=lr,
                         head_lr_mult=head_lr_mult, weight_decay=weight_decay, momentum=momentum,
                         sgd_momentum_quirk=sgd_momentum_quirk, frozen_levels=frozen_levels, **kwargs)
        if frozen_bn_affine:
            for module in self.backbone.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.requires_grad_(False)
        self.val_sweep_summary = None  # no CAM threshold sweep (CAMMedia reads it)

    def make_backbone(self) -> Backbone:
        """ResNet-50/101: the last stages dilated (OS8: layer3 + layer4, OS16: layer4); ResNet-18/34 (basic
        blocks cannot be dilated) and EfficientNet-Lite0: output stride 16 only, without dilation."""
        hp = self.hparams
        dilatable = hp.backbone in ("resnet50", "resnet101")
        if not dilatable and hp.output_stride != 16:
            raise ValueError(f"{hp.backbone} cannot be dilated to output stride 8: set output_stride=16 "
                             "(or use resnet50/resnet101)")
        dilated = {8: 2, 16: 1}[hp.output_stride] if dilatable else 0
        strides = (2, 2, 2, 2) if dilatable else tuple(hp.backbone_strides)
        return build_backbone(hp.backbone, pretrained=hp.pretrained, strides=strides,
                              frozen_bn_stats=hp.frozen_bn_stats, download_weights=hp.download_weights,
                              dilated_stages=dilated)

    @property
    def num_outputs(self) -> int:
        return self.hparams.num_classes + 1  # background first

    @property
    def atrous_rates(self) -> tuple[int, ...]:
        hp = self.hparams
        return tuple(hp.atrous_rates) if hp.atrous_rates else DEFAULT_RATES[(hp.head, hp.output_stride)]

    def configure_heads(self) -> None:
        channels = self.backbone.level_channels
        if self.hparams.head == "deeplabv2":
            self.head = DeepLabV2Head(channels[-1], self.num_outputs, self.atrous_rates)
        else:
            self.head = DeepLabV3PlusHead(channels[-1], channels[1], self.num_outputs, self.atrous_rates)

    def forward(self, image: Tensor) -> Tensor:
        """Logits ``(B, C+1, h, w)`` at the head's resolution."""
        return self.head(self.backbone(image))

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Cross-entropy of the pixel labels (255 ignored), at the logit or the input resolution."""
        if "mask" not in batch:
            raise ValueError("DeepLab trains on pixel labels: set data.init_args.seed_dir to a pseudo-label folder "
                             "(`lit-wsss pipeline` does) or to a ground-truth mask folder")
        return {"seg": segmentation_loss(self(batch["image"]), batch["mask"], self.hparams.loss_resolution)}

    @torch.no_grad()
    def segment(self, image: Tensor, scales: Sequence[float] | None = None) -> Tensor:
        """Class scores ``(C+1, H, W)`` of one image ``(3, H, W)``: the max of the logits (fusion ``max``) or the
        mean of the probabilities (``mean``) over the scales (rescaled as every CAM method's,
        :func:`lit_wsss.cams.scaled_flip_pairs`) and their flips, each bilinearly resized to ``H x W``."""
        hp = self.hparams
        size = tuple(image.shape[-2:])
        maps = []
        for pair in scaled_flip_pairs(image, scales or hp.inference_scales):
            batch = pair if hp.inference_flip else pair[:1]
            logits = F.interpolate(self(batch).float(), size=size, mode="bilinear", align_corners=False)
            maps += [logits[0], *(logits[1:].flip(-1))]
        stacked = torch.stack(maps)
        return stacked.amax(0) if hp.inference_fusion == "max" else stacked.softmax(1).mean(0)

    def probabilities(self, scores: Tensor) -> Tensor:
        """:meth:`segment`'s scores as class probabilities: the max-fused logits through a softmax (``max``), the
        mean probabilities as they are (``mean``)."""
        return scores.softmax(0) if self.hparams.inference_fusion == "max" else scores

    def predict_mask(self, image: Tensor, scales: Sequence[float] | None = None, crf: bool = False) -> Tensor:
        """Label map ``(H, W)`` int64 of one normalised image: argmax of :meth:`segment`, after a CRF if asked."""
        scores = self.segment(image, scales)
        if not crf:
            return scores.argmax(0)
        from lit_wsss.refine.crf import crf_inference_softmax

        refined = crf_inference_softmax(denormalise(image), self.probabilities(scores).cpu().numpy())
        return torch.from_numpy(refined.argmax(0)).to(image.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """mIoU of the label maps on the ground-truth masks of the validation split (one confusion matrix)."""
        for image, mask, (height, width) in zip(batch["image"], batch["mask"], batch["size"].tolist()):
            prediction = self.predict_mask(image[:, :height, :width], self.hparams.val_scales)
            self.val_miou.update(prediction[None], mask[None, :height, :width].long())
        self.log("val/mIoU", self.val_miou, prog_bar=True, batch_size=batch["image"].shape[0])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """One ``{"image_id", "labels"}`` record per image: the label map at full resolution."""
        return [{"image_id": image_id,
                 "labels": self.predict_mask(image[:, :height, :width], crf=self.hparams.crf)}
                for image, image_id, (height, width) in zip(batch["image"], batch["image_id"], batch["size"].tolist())]

    def media_record(self, image: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """For the validation panels (``CAMMedia``): the probability map of each labelled class and the mask."""
        scores = self.segment(image, self.hparams.val_scales)
        keys = torch.nonzero(labels > 0.5).flatten()
        return {"high_res": self.probabilities(scores)[keys + 1], "keys": keys, "prediction": scores.argmax(0)}

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        hp = self.hparams
        record["segmentation"] = {
            "head": hp.head, "output_stride": hp.output_stride, "atrous_rates": list(self.atrous_rates),
            "inference_scales": list(hp.inference_scales), "inference_flip": hp.inference_flip,
            "inference_fusion": hp.inference_fusion, "val_scales": list(hp.val_scales), "crf": hp.crf,
            "crf_params": "kazuto1011 configs/voc12.yaml" if hp.crf else None,
            "loss_resolution": hp.loss_resolution, "frozen_bn_affine": hp.frozen_bn_affine,
            "recipe": "kazuto1011/deeplab-pytorch configs/voc12.yaml (see lit_wsss.modules.segmentation)",
        }
        return record


__all__ = ["DeepLab", "DeepLabV2Head", "DeepLabV3PlusHead"]
