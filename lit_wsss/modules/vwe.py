"""VWE: Learning Visual Words for Weakly-Supervised Semantic Segmentation.

Paper: Ru, Du, Wu, "Learning Visual Words for Weakly-Supervised Semantic Segmentation", IJCAI 2021; the
extended VWL version: Ru, Du, Zhan, Wu, IJCV 2022 (arXiv:2202.04812). Official code: rulixiang/vwe
(``network/resnet_cam.py``, ``train_cam.py``, ``infer_cam.py``; VWL under ``v2/``). Spec:
../shared/methods/vwe.md.

Unique here: a codebook of K = 256 visual words; each feature is softly assigned to the words (cosine +
softmax over detached features), the image's word histogram must predict the labels (this trains the
codebook) and a word classifier on GAP features must predict which words occur (this trains the backbone
on all object parts); hybrid spatial pyramid pooling replaces GAP before the image classifier during
training. At inference the CAM is the plain classifier on the features, flips merged by a MAX (P7), scales
summed, background a constant 0.14. VWL options: ``strategy="learned_v2"`` (decorrelation loss) and
``"memory_bank"`` (EMA codebook buffer, no stage-2 detach). The maths are in :mod:`lit_wsss.losses.vwe`.

Deviations from the official code: the stage-2 detach is ``requires_grad=False`` on the stem..layer2
(``frozen_levels=3``; memory_bank: ``frozen_levels=1`` keeps conv1/bn1 frozen only); rescaling of the
inference scales as in :func:`lit_wsss.cams.scaled_flip_pairs`. Attribute names ``classifier``,
``codebook``, ``fc_a``, ``fc_b`` follow the spec's names (vwe.md §2, P4); an official checkpoint in the
IRN layout converts through :mod:`lit_wsss.checkpoints`, but no released file was available to check the
names against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_wsss.cams import CAMRecord, multiscale_cams
from lit_wsss.losses.vwe import (
    BKG_SCORE,
    FLIP_FUSIONS,
    HSPP_LEVELS,
    MEMORY_BANK_RHO,
    STRATEGIES,
    hspp,
    init_codebook,
    memory_bank_step,
    vwe_losses,
    word_assignment,
    word_histogram,
    word_labels,
)
from lit_wsss.modules.base import WSSSModule
from lit_wsss.modules.cam_head import CAMHeadMixin


class VWE(CAMHeadMixin, WSSSModule):
    """VWE on the shared CAM head (vwe.md §2-§5, §7).

    Args:
        num_words: codebook size K (256).
        strategy: ``ijcai`` (default, the paper), ``learned_v2`` (VWL: + decorrelation loss) or
            ``memory_bank`` (VWL: EMA codebook, L = L1 + L3; use ``frozen_levels=1``, no stage-2 detach).
        hspp_gamma, hspp_levels: hybrid spatial pyramid pooling (2, (1, 2, 4)).
        flip_fusion: ``max`` (VWE's inference) or ``sum`` (IRN's).
        memory_bank_rho: EMA rate of the memory-bank codebook (1e-3).
        lr, cam_bg_threshold: VWE's recipe: lr 0.01 (new layers x10), background score 0.14 (0.13 for VWL).
        **kwargs: other :class:`CAMHeadMixin` / :class:`WSSSModule` arguments (ResNet-50 OS16, frozen
            stem..layer2, wd 1e-4, poly 0.9, IRN's momentum quirk P1: already the defaults).
    """

    high_res_rule = "full"  # infer_cam.py resizes straight to the image size (vwe.md §3)

    def __init__(
        self,
        num_words: int = 256,
        strategy: str = "ijcai",
        hspp_gamma: float = 2.0,
        hspp_levels: Sequence[int] = HSPP_LEVELS,
        flip_fusion: str = "max",
        memory_bank_rho: float = MEMORY_BANK_RHO,
        lr: float = 0.01,
        cam_bg_threshold: float = BKG_SCORE,
        **kwargs: Any,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown VWE strategy {strategy!r}; expected one of {list(STRATEGIES)}")
        if flip_fusion not in FLIP_FUSIONS:
            raise ValueError(f"unknown flip_fusion {flip_fusion!r}; expected one of {list(FLIP_FUSIONS)}")
        super().__init__(lr=lr, cam_bg_threshold=cam_bg_threshold, **kwargs)

    def configure_heads(self) -> None:
        super().configure_heads()
        hp, channels = self.hparams, self.backbone.out_channels
        codebook = init_codebook(hp.num_words, channels)
        if hp.strategy == "memory_bank":  # not learnt: an EMA buffer, saved with the checkpoint (§7b)
            self.register_buffer("codebook", codebook)
        else:
            self.codebook = nn.Parameter(codebook)
        self.fc_a = nn.Conv2d(hp.num_words, hp.num_classes, 1, bias=False)  # W_a: word histogram -> image
        self.fc_b = nn.Conv2d(channels, hp.num_words, 1, bias=False)  # W_b: GAP features -> words
        if hp.strategy == "memory_bank":  # L2 is dropped (§7b): W_a gets no loss; frozen so DDP sees no unused
            self.fc_a.requires_grad_(False)

    def head_outputs(self, features: Tensor) -> dict[str, Tensor]:
        """The heads on the last level ``F`` (vwe.md §2): ``p_img = W_cls HSPP(F)``, the word assignment ``S``,
        ``y_word``, ``p_word = W_b GAP(F)`` and, except for memory_bank, ``hist`` and ``p_w2i = W_a hist``."""
        hp = self.hparams
        assignment = word_assignment(features, self.codebook)
        outputs = {
            "p_img": self.classifier(hspp(features, hp.hspp_gamma, tuple(hp.hspp_levels))[..., None, None]).flatten(1),
            "assignment": assignment,
            "y_word": word_labels(assignment),
            "p_word": self.fc_b(features.mean(dim=(2, 3), keepdim=True)).flatten(1),
        }
        if hp.strategy != "memory_bank":
            outputs["hist"] = word_histogram(assignment)
            outputs["p_w2i"] = self.fc_a(outputs["hist"][..., None, None]).flatten(1)
        return outputs

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """L1 (HSPP image classification) + L2 (word histogram) + L3 (word classification), §2; VWL options §7."""
        hp = self.hparams
        features = self.features(batch["image"])
        codebook = self.codebook
        losses = vwe_losses(self.head_outputs(features), batch["labels"], strategy=hp.strategy, codebook=codebook)
        if hp.strategy == "memory_bank":  # the loss used the codebook from before this step (§7b)
            self.codebook.copy_(memory_bank_step(codebook, features.detach(), self.global_step, hp.memory_bank_rho))
        return losses

    @torch.no_grad()
    def infer_cams(self, image: Tensor, labels: Tensor) -> CAMRecord:
        """``infer_cam.py`` (§3): relu(W_cls F) per pass, flips merged by ``flip_fusion`` (max), scales summed,
        resized straight to the image size (P13: antialiased bicubic on the normalised tensor)."""
        keys = torch.nonzero(labels > 0.5).flatten()
        return multiscale_cams(lambda x: self.cams(self.features(x)), image, keys, self.hparams.cam_scales,
                               flip_fusion=self.hparams.flip_fusion, high_res=self.cam_high_res_rule)

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        record["cam"].update(flip_fusion=self.hparams.flip_fusion)
        record["vwe"] = {"strategy": self.hparams.strategy, "num_words": self.hparams.num_words,
                         "hspp_gamma": self.hparams.hspp_gamma, "hspp_levels": list(self.hparams.hspp_levels)}
        return record
