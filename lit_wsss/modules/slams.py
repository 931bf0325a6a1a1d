"""SLAMs-R: a RECONSTRUCTION of "Semantic Learning based Activation Map for WSSS".

Paper: Chen, Zhao, Liu, Shen, "SLAMs: Semantic Learning based Activation Map for Weakly Supervised
Semantic Segmentation", arXiv:2210.12417. No official code was found and the paper's method section was not
readable: ../shared/methods/slams.md specifies "SLAMs-R", the abstract's design with the loss formulas of the
first author's sibling SemFormer (JLChen-C/SemFormer) transplanted to a CNN. Nothing here may be quoted as
the paper's method; every reconstructed choice is marked [R] below and in :mod:`lit_wsss.losses.slams`.

Two stages, two modules (two ``fit`` runs; ``lit-wsss pipeline --method slams`` chains them):

- :class:`SemanticEncoder` (stage A, ``METHOD=slams_encoder``): a CNN [R: ResNet-50 / any lit_wsss backbone]
  whose 1x1 projection gives one embedding per category (background included) and learnable category
  semantics; BCE of their cosine against the labels (slams.md §2). Its checkpoint is scored by a label-only
  criterion (mAP of the similarities, P5), never by masks.
- :class:`SLAMs` (stage B, ``METHOD=slams``): an activation-map network with C+1 output channels [R:
  IRN-style backbone + 1x1 conv]; its sigmoid masks cut each image into category-foreground and -background
  images that the FROZEN encoder must recognise (category-foreground / -background losses), plus activation
  regularisation and consistency [R: complementation by default, view consistency as an option] (§3). CAMs
  at inference are relu(logits) of the object channels, 4 scales + flip (§4).

Deviations and reconstructed choices [R]: CNN backbones instead of DeiT; no auto-encoder decoder (no
reconstruction loss); stage B uses the ``irn_cls_valid`` augmentation (no colour jitter or expansion) for
the in-image mask; checkpoints by the last epoch (stage B) or the label-only mAP (stage A).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.classification import MultilabelAveragePrecision

from lit_wsss.backbones import Backbone, build_backbone
from lit_wsss.cams import CAMRecord, multiscale_cams
from lit_wsss.checkpoints import read_weights_file
from lit_wsss.errors import WeightsFileError
from lit_wsss.losses.slams import (
    SE_SIZE,
    SLAMS_CAM_SCALES,
    activation_map_losses,
    cam_from_logits,
    encoder_losses,
    encoder_similarity,
    se_image,
    semantic_embeddings,
)
from lit_wsss.modules.base import WSSSModule
from lit_wsss.modules.cam_head import CAMHeadMixin


class SemanticEncoderNet(nn.Module):
    """The semantic encoder: backbone -> 1x1 projection to K*E -> summed embeddings ``(B, K, E)`` (§2)."""

    def __init__(self, backbone: Backbone, num_categories: int, embed_dim: int, se_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_categories, self.se_size = num_categories, se_size
        self.projection = nn.Conv2d(backbone.out_channels, num_categories * embed_dim, 1, bias=False)
        self.semantics = nn.Embedding(num_categories, embed_dim)

    def forward(self, image: Tensor) -> Tensor:
        """Embeddings of images already at the encoder size."""
        return semantic_embeddings(self.backbone(image)[-1], self.projection.weight, self.num_categories)

    def embed(self, image: Tensor) -> Tensor:
        """Embeddings of images of any size (bilinear to ``se_size``, align_corners=True as §3's x_s)."""
        return self(se_image(image, (self.se_size, self.se_size)))


class SemanticEncoder(WSSSModule):
    """Stage A of SLAMs-R (slams.md §2, SemFormer ``train_caae.py`` recipe minus the decoder [R]).

    Args:
        embed_dim: E (256).
        se_size: encoder input size (224); images are resized to it.
        lr, weight_decay, nesterov, frozen_levels: SemFormer's stage-A recipe: lr 0.025, wd 5e-4, Nesterov,
            nothing frozen [R for a CNN: the stem stays frozen, as in every lit_wsss ResNet recipe].
        **kwargs: :class:`WSSSModule` arguments.
    """

    def __init__(self, embed_dim: int = 256, se_size: int = SE_SIZE, lr: float = 0.025,
                 weight_decay: float = 5e-4, nesterov: bool = True, frozen_levels: int = 1, **kwargs: Any) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, nesterov=nesterov, frozen_levels=frozen_levels, **kwargs)

    def configure_heads(self) -> None:
        hp = self.hparams
        self.net = SemanticEncoderNet(self.backbone, hp.num_classes + 1, hp.embed_dim, hp.se_size)

    def configure_metrics(self) -> None:
        """Label-only checkpoint criterion (P5): mAP of the foreground similarities."""
        self.val_map = MultilabelAveragePrecision(num_labels=self.hparams.num_classes)

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return encoder_losses(self.net.embed(batch["image"]), self.net.semantics.weight, batch["labels"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        for image, labels, (height, width) in zip(batch["image"], batch["labels"], batch["size"].tolist()):
            embeddings = self.net.embed(image[None, :, :height, :width])
            similarity = encoder_similarity(embeddings, self.net.semantics.weight, labels[None])[:, 1:]
            self.val_map.update(similarity, labels[None].long())
        self.log("val/mAP", self.val_map, prog_bar=True, batch_size=batch["image"].shape[0])


class SLAMs(CAMHeadMixin, WSSSModule):
    """Stage B of SLAMs-R (slams.md §3-§4) on the shared CAM head.

    Args:
        encoder_checkpoint: the stage-A checkpoint (``lit-wsss fit`` of ``experiments/methods/slams_encoder.yaml``);
            required: the encoder is what SLAMs learns from.
        encoder_backbone: the encoder's backbone name (as trained in stage A).
        embed_dim, se_size: as in stage A (256, 224).
        w_cf, w_cb, w_ar, w_con, w_cls: loss weights (1, 1, 0.075, 1, 0 [R: SemFormer's fifth term off]).
        consistency: ``complementation`` (default, [S] act_cplt_loss) or ``view`` ([R] flip consistency).
        lr, weight_decay, nesterov: SemFormer's stage-B recipe (0.005, 5e-4, Nesterov; new layers x10).
        cam_scales: (0.5, 1.0, 1.5, 2.0) + flip, summed.
        **kwargs: other :class:`CAMHeadMixin` / :class:`WSSSModule` arguments.
    """

    high_res_rule = "full"  # slams.md §4: "to full size"

    def __init__(
        self,
        encoder_checkpoint: str | None = None,
        encoder_backbone: str = "resnet50",
        embed_dim: int = 256,
        se_size: int = SE_SIZE,
        w_cf: float = 1.0,
        w_cb: float = 1.0,
        w_ar: float = 0.075,
        w_con: float = 1.0,
        w_cls: float = 0.0,
        consistency: str = "complementation",
        lr: float = 0.005,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        cam_scales: Sequence[float] = SLAMS_CAM_SCALES,
        **kwargs: Any,
    ) -> None:
        if w_cls:
            raise ValueError("w_cls (SemFormer's segmentor-similarity term) needs class-token embeddings that "
                             "this CNN reconstruction does not have; keep w_cls = 0")
        super().__init__(lr=lr, weight_decay=weight_decay, nesterov=nesterov, cam_scales=cam_scales, **kwargs)

    def configure_heads(self) -> None:
        # Z: C+1 logits, channel 0 = background [R: IRN-style 1x1 conv on the last level]
        self.classifier = nn.Conv2d(self.backbone.out_channels, self.hparams.num_classes + 1, 1, bias=False)
        self.encoder = self._load_encoder()

    def _load_encoder(self) -> SemanticEncoderNet:
        hp = self.hparams
        if hp.encoder_checkpoint is None:
            raise ValueError("SLAMs needs encoder_checkpoint: train stage A first (`make train METHOD=slams_encoder`, "
                             "or `lit-wsss pipeline --method slams`, which runs it)")
        path = Path(hp.encoder_checkpoint)
        backbone = build_backbone(hp.encoder_backbone, pretrained=None)
        encoder = SemanticEncoderNet(backbone, hp.num_classes + 1, hp.embed_dim, hp.se_size)
        state = read_weights_file(path, "encoder_checkpoint", "a stage-A SemanticEncoder .ckpt")
        if not isinstance(state, dict):
            raise WeightsFileError(f"encoder_checkpoint: {path} holds a {type(state).__name__}, expected a .ckpt")
        state = {k[len("net."):]: v for k, v in state.get("state_dict", state).items() if k.startswith("net.")}
        try:
            encoder.load_state_dict(state)
        except RuntimeError as error:
            raise WeightsFileError(f"encoder_checkpoint {path} does not fit a {hp.encoder_backbone} semantic encoder "
                             f"with {hp.num_classes + 1} categories x {hp.embed_dim}: {error}") from None
        encoder.requires_grad_(False)  # frozen but differentiable: no torch.no_grad around it (P3)
        return encoder.eval()

    def train(self, mode: bool = True) -> SLAMs:
        """Lightning calls ``train()`` every epoch; the encoder stays in eval mode (P3)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def segment(self, image: Tensor) -> Tensor:
        """Logits Z ``(B, C+1, h, w)``."""
        return self.classifier(self.features(image))

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """L_cf + L_cb + L_ar + L_con with the frozen encoder (§3)."""
        hp = self.hparams
        image = batch["image"]
        valid = torch.stack(list(batch["valid"])).to(image.device) if "valid" in batch else None
        logits = self.segment(image)
        flipped = self.segment(image.flip(-1)) if hp.consistency == "view" else None
        return activation_map_losses(
            logits, image, batch["labels"], self.encoder, self.encoder.semantics.weight, valid,
            se_size=(hp.se_size, hp.se_size), w_cf=hp.w_cf, w_cb=hp.w_cb, w_ar=hp.w_ar, w_con=hp.w_con,
            consistency=hp.consistency, logits_flipped=flipped,
        )

    @torch.no_grad()
    def infer_cams(self, image: Tensor, labels: Tensor) -> CAMRecord:
        """relu(Z) of the object channels (raw logits, not sigmoid), scales + flips summed, per-class
        max-normalised, resized straight to the image size (§4, P6). SemFormer's class-to-patch attention
        factor has no CNN counterpart and is omitted [S/R]."""
        keys = torch.nonzero(labels > 0.5).flatten()
        return multiscale_cams(lambda x: cam_from_logits(self.segment(x)), image, keys, self.hparams.cam_scales,
                               high_res=self.cam_high_res_rule)

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        hp = self.hparams
        record["slams"] = {
            "reconstruction": "SLAMs-R (slams.md): not the paper's code", "encoder_checkpoint": hp.encoder_checkpoint,
            "consistency": hp.consistency, "weights": {"cf": hp.w_cf, "cb": hp.w_cb, "ar": hp.w_ar, "con": hp.w_con},
        }
        return record
