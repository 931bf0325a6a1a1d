"""GSLM (a.k.a. CLS): the General-Specific Learning Mechanism with Seed Reactivation.

Paper: Yang, Mai, Zhang, Liu, Han, "Exploit CAM by itself: Complementary Learning System for Weakly
Supervised Semantic Segmentation", TMLR 2024 (arXiv:2303.02449). Official code: tmlr-group/GSLM
(``step/train_fuse_cam.py``, ``net/extractor/resnet50_wam.py``). Spec: ../shared/methods/cls.md. Only the
abstract was readable: the mapping of the code to the paper's words (GLM, SLM, "Seed Reactivation") is the
spec's interpretation (cls.md §4). VOC only officially; COCO configs are a reconstruction (cls.md §7).

The GLM is the baseline :class:`~lit_wsss.modules.CAM`. This module is the SLM: the same backbone and 1x1
classifier, initialised from the GLM (``glm_weights``, loaded with the new pooling head missing) or from the
previous round (``init_weights``), with a bounded CAM (ReLU6, tau = 6) and a learned spatial pooling head,
trained with the image-label loss plus a smooth-L1 regression of the max-normalised bounded CAM (x6) onto
the round's CRF seeds (data ``seed_dir``). The rounds (GLM -> seeds -> SLM -> seeds -> ...) are driven by
``lit-wsss gslm`` (:mod:`lit_wsss.gslm_rounds`), which ``make train METHOD=gslm`` runs. The maths are in
:mod:`lit_wsss.losses.gslm`.

Switch of pitfall P1: ``head="wam"`` (default) is the network the run script DECLARES (ReLU6 CAM, learned
pooling, CAMs = mean / 6); ``head="cam"`` is the one the released ``train_fuse_cam.py`` actually TRAINS
(ReLU CAM, GAP, CAMs normalised by their max). Every checkpoint and CAM manifest records which.

Deviations from the official code: the stage-2 detach is ``requires_grad=False`` (``frozen_levels=3``);
rescaling of the inference scales as in :func:`lit_wsss.cams.scaled_flip_pairs`; in-round evaluation
reports the raw CAM at the round's threshold and the sweep (the official in-loop evaluation adds a CRF, P6).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_wsss.cams import CAMRecord, multiscale_cams
from lit_wsss.checkpoints import load_initial_state_dict
from lit_wsss.losses.gslm import SLM_HEADS, TAU, WAM_POOL_SIZE, bounded_cam, gap_logits, slm_losses, wam_normalise
from lit_wsss.modules.base import WSSSModule
from lit_wsss.modules.cam_head import CAMHeadMixin


class GSLM(CAMHeadMixin, WSSSModule):
    """The SLM of GSLM on the shared CAM head (cls.md §2.4-§3).

    Args:
        head: ``wam`` (declared SLM, default) or ``cam`` (the network the released script trains), P1.
        tau: activation bound and regression scale (6).
        seg_weight: weight of the seed regression (``fuse_cam_seg_loss_rate`` 0.5).
        seg_reduction: ``sum`` over images and present classes (official, P3) or ``mean``.
        pool_size: the pooling head's kernel (32 = the feature size of 512 crops at stride 16).
        glm_weights: the GLM checkpoint a first round starts from (its pooling head is new).
        lr, cam_bg_threshold: the SLM recipe: lr 0.001 (classifier + pooling head x10); the evaluation
            threshold rises by 0.1 per round from 0.15 (``lit-wsss gslm`` sets it).
        **kwargs: other :class:`CAMHeadMixin` / :class:`WSSSModule` arguments (ResNet-50 OS16, frozen
            stem..layer2, wd 1e-4, poly 0.9 per round, IRN's momentum quirk: already the defaults).
    """

    high_res_rule = "full"  # step/make_cam.py + mixin_multi_cams: straight to the image size (issue 13)

    def __init__(
        self,
        head: str = "wam",
        tau: float = TAU,
        seg_weight: float = 0.5,
        seg_reduction: str = "sum",
        pool_size: int = WAM_POOL_SIZE,
        glm_weights: str | None = None,
        lr: float = 0.001,
        **kwargs: Any,
    ) -> None:
        if head not in SLM_HEADS:
            raise ValueError(f"unknown SLM head {head!r}; expected one of {list(SLM_HEADS)} (cls.md P1)")
        super().__init__(lr=lr, **kwargs)
        if glm_weights is not None:
            self.load_state_dict(load_initial_state_dict(glm_weights, self, allow_missing=("pool.",)))

    def configure_heads(self) -> None:
        super().configure_heads()
        if self.hparams.head == "wam":  # conv C -> C over the adaptively pooled A: a learned weighting of GAP
            size = self.hparams.pool_size
            self.pool = nn.Conv2d(self.hparams.num_classes, self.hparams.num_classes, size, bias=False)

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """MLSM(logits, y) + 0.5 L_seg on the round's seeds (§2.4)."""
        if "mask" not in batch:
            raise ValueError("the SLM trains on pixel seeds: set data.init_args.seed_dir to the round's pseudo "
                             "masks (`lit-wsss gslm` does)")
        hp = self.hparams
        cam_logits = self.classifier(self.features(batch["image"]))
        return slm_losses(self.slm_logits(cam_logits), cam_logits, batch["labels"], batch["mask"], head=hp.head,
                          seg_weight=hp.seg_weight, tau=hp.tau, seg_reduction=hp.seg_reduction)

    def slm_logits(self, cam_logits: Tensor) -> Tensor:
        """Image logits ``(B, C)``: the learned pooling ``Conv_{C->C, k x k}(AdaptiveAvgPool_{k x k}(A))`` of the
        raw map (``wam``, §2.4, P10; the GAP of maps whose size is a multiple of k when the weight is 1/k^2 on
        the diagonal) or GAP (``cam``, P1)."""
        if self.hparams.head == "wam":
            size = self.pool.kernel_size
            return self.pool(F.adaptive_avg_pool2d(cam_logits, size)).flatten(1)
        return gap_logits(cam_logits)

    @torch.no_grad()
    def infer_cams(self, image: Tensor, labels: Tensor) -> CAMRecord:
        """wam: relu6 CAMs, mean of the 8 maps / tau (absolute); cam: the GLM's normalisation (§2.2, §3, P2)."""
        hp = self.hparams
        keys = torch.nonzero(labels > 0.5).flatten()

        def cam_logits(x: Tensor) -> Tensor:
            return self.classifier(self.features(x))

        if hp.head == "wam":
            return multiscale_cams(lambda x: bounded_cam(cam_logits(x), hp.tau), image, keys, hp.cam_scales,
                                   high_res=self.cam_high_res_rule,
                                   normalise=lambda summed, maps: wam_normalise(summed, maps, hp.tau))
        return multiscale_cams(lambda x: F.relu(cam_logits(x)), image, keys, hp.cam_scales,
                               high_res=self.cam_high_res_rule)

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        hp = self.hparams
        record["cam"]["normalisation"] = ("mean of the 8 bounded maps / tau (absolute)" if hp.head == "wam"
                                          else "per-class max + 1e-5")
        record["gslm"] = {"head": hp.head, "tau": hp.tau, "seg_weight": hp.seg_weight,
                          "seg_reduction": hp.seg_reduction, "glm_weights": hp.glm_weights}
        return record
