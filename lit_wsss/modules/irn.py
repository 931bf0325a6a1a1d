"""IRNet: inter-pixel relations learnt from CAM seeds, for class boundaries and the random walk.

Paper: Ahn, Cho, Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel Relations",
CVPR 2019 (arXiv:1904.05044). Official code: jiwoon-ahn/irn (``net/resnet50_irn.py``, ``step/train_irn.py``,
``step/make_sem_seg_labels.py``). Spec: ../shared/methods/protocol.md §6.2-§6.5.

Unique here: an edge branch and a displacement branch on an entirely frozen ResNet-50 (ImageNet weights, not
the CAM weights), trained with affinity labels derived from IR labels through the path index; at inference
the boundary map drives a random walk of the stride-4 CAMs. Shared parts (path index, losses, random walk)
live in ``lit_wsss.refine`` and ``lit_wsss.losses.irn``.

Deviations from the official code: the frozen backbone has ``requires_grad=False`` and runs under
``torch.no_grad`` instead of detaching every stage; images larger than 512 px are padded to the next multiple
of 16 at inference (the official code assumes <= 512); the instance branch's mean shift is not kept
(semantic pseudo labels only use the edge map, §6.2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_wsss.cams import cams_to_mask
from lit_wsss.losses.irn import irn_loss
from lit_wsss.modules.base import WSSSModule
from lit_wsss.refine.path_index import PathIndex, affinity_labels
from lit_wsss.refine.random_walk import random_walk, walk_scores

#: ``boundary_canvas`` -> the smallest canvas side: IRN pads every image to at least 512 (``fit``: none).
CANVASES = {"irn": 512, "fit": 16}


def _branch(in_channels: int, out_channels: int, groups: int, upsample: float = 1) -> nn.Sequential:
    """1x1 conv (no bias) -> GroupNorm -> [bilinear resize] -> ReLU, as every IRNet side layer.

    ``upsample`` is IRN's factor for ResNet levels (1, 1, 2, 4, 4 towards stride 4); other backbones get
    ``level stride / target stride`` (e.g. 0.5 for a stride-2 level).
    """
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.GroupNorm(groups, out_channels)]
    if upsample != 1:
        layers.append(nn.Upsample(scale_factor=upsample, mode="bilinear", align_corners=False))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _crop_to(tensor: Tensor, reference: Tensor) -> Tensor:
    return tensor[..., : reference.shape[-2], : reference.shape[-1]]


class IRN(WSSSModule):
    """IRNet on the shared base (protocol.md §6).

    Args:
        path_radius: training radius of the path index on the stride-4 grid (γ = 10, 152 directions).
        crop_size: training crop; the path index is built for ``crop_size / 4``.
        infer_radius: radius of the random-walk affinities (5, 34 directions).
        beta: exponent of the affinities in the transition matrix (10).
        exp_times: log2 of the walk length (8 => 256 steps; pitfall P6).
        sem_seg_bg_threshold: background plane after the walk (0.25).
        walk_method: ``sparse`` (2^exp_times sparse products, memory linear in pixels) or ``dense`` (the
            official dense matrix power; same labels, cubic time).
        explicit_bg_power: CAMs with their own background (SIPE): every channel, background included, is
            raised to this power before the walk and the labels are a plain argmax, no background plane
            (SIPE ``make_seg_labels.py``: 1.5, sipe.md §5.4, S3). Unused for constant-background CAMs.
        boundary_canvas: the zero-padded canvas the boundary map is inferred on (:meth:`boundary`): ``irn``
            (IRN's, at least 512 x 512: every VOC image is padded to 512) or ``fit`` (the image rounded up to a
            multiple of 16: a 320 x 240 image costs 3.4x less). The boundary near the bottom and right edges
            depends on the padding, so the labels differ slightly (docs/benchmarks.md, "IRNet canvas").
        **kwargs: :class:`WSSSModule` arguments. Defaults follow §6.4: frozen ResNet-50 (all 5 levels), edge
            parameters at ``lr`` = 0.1, displacement parameters at ``lr * head_lr_mult`` = 1.0, wd 1e-4, poly
            0.9, IRN's momentum quirk.
    """

    def __init__(
        self,
        path_radius: int = 10,
        crop_size: int = 512,
        infer_radius: int = 5,
        beta: float = 10.0,
        exp_times: int = 8,
        sem_seg_bg_threshold: float = 0.25,
        walk_method: str = "sparse",
        explicit_bg_power: float = 1.5,
        boundary_canvas: str = "irn",
        frozen_levels: int = 5,
        **kwargs: Any,
    ) -> None:
        super().__init__(frozen_levels=frozen_levels, **kwargs)
        if walk_method not in ("sparse", "dense"):
            raise ValueError(f"walk_method must be 'sparse' or 'dense', got {walk_method!r}")
        if boundary_canvas not in CANVASES:
            raise ValueError(f"boundary_canvas must be one of {list(CANVASES)}, got {boundary_canvas!r}")
        self.path_index = PathIndex(path_radius, crop_size // 4, crop_size // 4)

    def configure_heads(self) -> None:
        channels, strides = self.backbone.level_channels, self.backbone.level_strides
        if len(channels) != 5:
            raise ValueError(f"IRN needs a backbone with 5 levels, {self.hparams.backbone} has {len(channels)}")
        # every edge level is resized to stride 4; displacement levels 3-5 to stride 8, levels 1-2 to stride 4
        self.edge_layers = nn.ModuleList(
            [_branch(c, 32, 4, s / 4) for c, s in zip(channels, strides)]
        )
        self.edge_out = nn.Conv2d(160, 1, 1, bias=True)
        widths, groups, targets = (64, 128, 256, 256, 256), (8, 16, 16, 16, 16), (4, 4, 8, 8, 8)
        self.disp_layers = nn.ModuleList(
            [_branch(c, w, g, s / t) for c, w, g, s, t in zip(channels, widths, groups, strides, targets)]
        )
        self.disp_merge = _branch(768, 256, 16, 2)
        self.disp_out = nn.Sequential(
            nn.Conv2d(448, 256, 1, bias=False), nn.GroupNorm(16, 256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 2, 1, bias=False),
        )

    def configure_metrics(self) -> None:
        """IRNet is not scored during training (its output is scored as pseudo labels)."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Edge branch at ``lr``, displacement branch at ``lr * head_lr_mult`` (§6.4); the backbone is frozen."""
        edge = [*self.edge_layers.parameters(), *self.edge_out.parameters()]
        disp = [*self.disp_layers.parameters(), *self.disp_merge.parameters(), *self.disp_out.parameters()]
        return [
            {"name": "edge", "params": edge, "lr": self.hparams.lr},
            {"name": "displacement", "params": disp, "lr": self.hparams.lr * self.hparams.head_lr_mult},
        ]

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Edge logits ``(B, 1, H/4, W/4)`` and displacement ``(B, 2, H/4, W/4)``."""
        with torch.no_grad():  # the backbone is frozen (requires_grad=False); no graph is needed below it
            levels = self.backbone(image)
        edges = [layer(x) for layer, x in zip(self.edge_layers, levels)]
        reference = edges[1]
        edge = self.edge_out(torch.cat([_crop_to(e, reference) for e in edges], dim=1))
        d1, d2, d3, d4, d5 = (layer(x) for layer, x in zip(self.disp_layers, levels))
        merged = self.disp_merge(torch.cat([d3, _crop_to(d4, d3), _crop_to(d5, d3)], dim=1))
        displacement = self.disp_out(torch.cat([d1, d2, _crop_to(merged, d2)], dim=1))
        return edge, displacement

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """§6.4 on affinity labels from the IR labels, nearest-downsampled x0.25 like PIL (pixel centres)."""
        edge, displacement = self(batch["image"])
        index = self.path_index.to(edge.device)
        reduced = batch["mask"][:, 2::4, 2::4]  # PIL NEAREST x0.25 samples pixel 4i + 2
        per_image = [affinity_labels(label, index, num_classes=self.hparams.num_classes + 1) for label in reduced]
        labels = {name: torch.stack([pairs[name] for pairs in per_image]) for name in per_image[0]}
        return irn_loss(edge, displacement, labels, index)

    @torch.no_grad()
    def boundary(self, image: Tensor, height: int, width: int) -> Tensor:
        """B = sigmoid(edge(img)/2 + flip(edge(flip img))/2) on a zero-padded canvas, cropped to ceil(H/4) x ceil(W/4).

        The canvas is ``boundary_canvas``'s: IRN's is at least 512 x 512, ``fit`` the size rounded up to 16.
        """
        smallest = CANVASES[self.hparams.boundary_canvas]
        canvas_h = max(smallest, -(-height // 16) * 16)
        canvas_w = max(smallest, -(-width // 16) * 16)
        padded = F.pad(image[None, :, :height, :width], (0, canvas_w - width, 0, canvas_h - height))
        edge, _ = self(torch.cat([padded, padded.flip(-1)], dim=0))
        edge = edge.float()  # bf16-mixed: B, and the CAMs cast to it below, stay float32 (lit_wsss.precision)
        edge = torch.sigmoid(edge[0] / 2 + edge[1].flip(-1) / 2)[0]
        return edge[: -(-height // 4), : -(-width // 4)]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        """Pseudo labels: boundary map -> random walk of the stride-4 CAMs -> labels (§6.5)."""
        records = []
        backgrounds = batch.get("bg_cam") or [None] * len(batch["image_id"])
        for image, image_id, (height, width), cam, keys, bg_cam in zip(
            batch["image"], batch["image_id"], batch["size"].tolist(), batch["cam"], batch["keys"], backgrounds
        ):
            boundary = self.boundary(image, height, width)
            cam = cam.to(boundary)
            if bg_cam is not None:  # SIPE: X = [bg, cams]^1.5, walked like any class (sipe.md §5.4)
                cam = torch.cat([bg_cam.to(boundary)[None], cam]) ** self.hparams.explicit_bg_power
            walked = random_walk(
                cam, boundary, beta=self.hparams.beta, exp_times=self.hparams.exp_times,
                radius=self.hparams.infer_radius, method=self.hparams.walk_method,
            )
            # stored as float16; the labels are decoded from the stored values so files and PNG agree exactly
            scores = walk_scores(walked, height, width).half()
            record = {"image_id": image_id, "keys": keys}
            if bg_cam is not None:
                record.update(bg=scores[0], high_res=scores[1:])
                bg = scores[0].float()
            else:
                record["high_res"], bg = scores, None
            record["labels"] = cams_to_mask(record["high_res"].float(), keys.to(scores.device),
                                            self.hparams.sem_seg_bg_threshold, bg)
            records.append(record)
        return records

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        hp = self.hparams
        record["irn"] = {
            "path_radius": hp.path_radius, "infer_radius": hp.infer_radius, "beta": hp.beta,
            "exp_times": hp.exp_times, "walk_steps": 2**hp.exp_times, "sem_seg_bg_threshold": hp.sem_seg_bg_threshold,
            "walk_method": hp.walk_method, "explicit_bg_power": hp.explicit_bg_power,
            "boundary_canvas": f"{hp.boundary_canvas} (at least {CANVASES[hp.boundary_canvas]} px, multiple of 16)",
            "background": "sem_seg_bg_threshold plane, or argmax with the CAMs' own bg (walked, ^power)",
        }
        return record
