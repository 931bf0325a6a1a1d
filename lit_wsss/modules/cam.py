"""Baseline CAM, the IRN classifier.

Paper: Ahn, Cho, Kwak, "Weakly Supervised Learning of Instance Segmentation with Inter-pixel Relations",
CVPR 2019 (arXiv:1904.05044); CAM itself: Zhou et al., "Learning Deep Features for Discriminative
Localization", CVPR 2016 (arXiv:1512.04150). Official code: jiwoon-ahn/irn (``net/resnet50_cam.py``,
``step/train_cam.py``, ``step/make_cam.py``).
"""

from __future__ import annotations

from lit_wsss.modules.base import WSSSModule
from lit_wsss.modules.cam_head import CAMHeadMixin


class CAM(CAMHeadMixin, WSSSModule):
    """IRN's CAM classifier (../shared/methods/protocol.md §3-§5): nothing beyond the shared head.

    Recipe (defaults): ResNet-50 ImageNet, strides (2, 2, 2, 1), FixedBatchNorm everywhere, no gradient into
    conv1..layer2, GAP + 1x1 classifier without bias, multi-label soft-margin loss, SGD lr 0.1 (classifier
    1.0), weight decay 1e-4, poly 0.9, effective momentum 1e-4 (IRN's PolyOptimizer quirk; pass
    ``sgd_momentum_quirk=False`` for textbook SGD with momentum 0.9); batch 16, 5 epochs on train_aug with
    512 crops (the data config). CAMs: scales (1.0, 0.5, 1.5, 2.0) + flip, evaluated at background 0.15.

    Deviations from the official code: frozen levels use ``requires_grad=False`` instead of ``.detach()``
    (same gradients, DDP-safe); the schedule length is Lightning's ``estimated_stepping_batches`` (equal to
    IRN's ``max_step`` on one device); multi-scale rescaling is done on the normalised tensor with
    antialiased bicubic interpolation instead of PIL bicubic on uint8 (see ``lit_wsss.cams``).
    """
