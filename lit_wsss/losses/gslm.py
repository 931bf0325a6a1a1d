"""GSLM (CLS): GLM CAM, bounded SLM CAM head, seed-reactivation regression and the multi-scale CAMs.

Pure functions of tensors (batch-first, no module state: the classifier and pooling-head weights are
passed in as tensors), reimplemented from ../shared/methods/cls.md §2 (forward passes, losses, multi-scale
CAM), §3 (inference), §5 (hyperparameters) and §8 (pitfalls); tests follow §10
items 1-7. ``C`` foreground classes (no background channel), ``A`` the raw classifier map, ``y`` the
``(B, C)`` foreground multi-hot labels, ``Y`` a seed map with 0 = background, ``c + 1`` = class ``c``,
255 = ignore::

    A        = W . F                    1x1 conv, no bias (the module's classifier)       (§2.1)
    logits   = GAP(A)                   (= W . GAP(F), §10 item 7)             gap_logits
    L_GLM    = MLSM(logits, y)
    Ab       = relu6(A) = min(max(A, 0), tau), tau = 6                         bounded_cam  (§2.4, P9)
    logits   = Conv_{C->C, k x k}( AdaptiveAvgPool_{k x k}(A) ), k = 32        GSLM.slm_logits (§2.4, P10)
    Y        = nearest-downsample(pseudo mask) to (h, w)                       downsample_seeds (P5)
    A^_{b,c} = Ab_{b,c} / (max over ALL h x w pixels of Ab_{b,c} + 1e-5)      (not detached, P4)
    L_seg    = sum_b sum_{c in I_b} SmoothL1_{beta=1, mean over p in V_b}(tau A^, tau 1[Y = c + 1])
               V_b = {p : Y_b[p] != 255}; images with empty V_b contribute a zero tensor (P13)  seg_loss (P3)
    L_SLM    = MLSM(logits, y) + 0.5 L_seg                                    slm_losses

    GLM mixin: M = sum over 4 scales x 2 flips of bilinear_up(relu(A)) / (per-class max + 1e-5)   (§2.2)
    WAM mixin: M = mean over the 8 maps of bilinear_up(relu6(A)) / tau    wam_normalise (GSLM.infer_cams)

The seeds (§2.3, P7: IRN's IR-label cut at 0.30 / 0.05 with a CRF of Gaussian compat 10) and the round
schedule (§2.5) are the round driver's, :mod:`lit_wsss.gslm_rounds`, which cuts seeds with ``lit-wsss ir-labels``.

Second-stage network (pitfall P1): ``head="wam"`` is the network the spec calls the intended SLM
(ReLU6 CAM, learned pooling head, WAM mixin); ``head="cam"`` is what the released ``train_fuse_cam.py``
actually trains (``args.cam_network``: ReLU CAM, GAP logits, GLM mixin, the same L_seg on ``relu(A)``).
The learnable parts (backbone and its stage-2 detach, the classifier, the pooling head, the non-strict
load of the GLM weights, the per-round optimiser restart) belong to the module and the round driver.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_wsss.io import IGNORE_INDEX
from lit_wsss.precision import float32

#: Activation bound tau of the SLM: ReLU6 cap, regression target on seeds, WAM-mixin divisor (cls.md §5).
TAU = 6.0
#: Constant added to the per-class max in L_seg's normalisation and in the GLM mixin (cls.md §2.2, §2.4).
GSLM_EPS = 1e-5
#: ``fuse_cam_seg_loss_rate``: weight of L_seg in L_SLM (cls.md §2.4, §5).
SEG_LOSS_WEIGHT = 0.5
#: SmoothL1 transition point of L_seg (cls.md §2.4).
SMOOTH_L1_BETA = 1.0
#: Output size of the adaptive pool (= kernel of the pooling conv) of the WAM head: a 512 crop at stride 16.
WAM_POOL_SIZE = 32
#: The two second-stage networks of pitfall P1: the intended WAM head and the trained plain CAM head.
SLM_HEADS = ("wam", "cam")
#: Reductions of L_seg: the official sum over images and present classes, or its mean (P3, corrected).
SEG_REDUCTIONS = ("sum", "mean")
#: Names of the terms returned by :func:`slm_losses` (already weighted; the caller sums them).
LOSS_KEYS = ("cls", "seg")


# ----------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------


def _check_maps(a: Tensor, name: str = "cam_logits") -> None:
    if a.dim() != 4:
        raise ValueError(f"{name} must be (B, C, h, w), got {tuple(a.shape)}")


def _check_labels(a: Tensor, labels: Tensor) -> None:
    if labels.dim() != 2 or tuple(labels.shape) != tuple(a.shape[:2]):
        raise ValueError(
            f"labels must be (B, C) = {tuple(a.shape[:2])} foreground multi-hot, got {tuple(labels.shape)}"
        )


def _check_head(head: str) -> None:
    if head not in SLM_HEADS:
        raise ValueError(f"unknown SLM head {head!r}; expected one of {list(SLM_HEADS)} (cls.md P1)")


# ----------------------------------------------------------------------------------------------------
# GLM (§2.1) and the SLM heads (§2.4)
# ----------------------------------------------------------------------------------------------------


def gap_logits(cam_logits: Tensor) -> Tensor:
    """GLM logits ``GAP(A)`` ``(B, C)`` (cls.md §2.1); equal to IRN's ``W . GAP(F)`` by linearity (§10.7)."""
    _check_maps(cam_logits)
    return cam_logits.mean(dim=(-2, -1))


def bounded_cam(cam_logits: Tensor, tau: float = TAU) -> Tensor:
    """The SLM's bounded CAM ``Ab = min(max(A, 0), tau)`` (ReLU6 for tau = 6; cls.md §2.4, P9).

    The "Seed Reactivation" boundary: pixels with ``A >= tau`` or ``A <= 0`` get zero gradient (as
    :func:`torch.nn.functional.relu6`: the gradient is 1 only strictly inside ``(0, tau)``).

    Args:
        cam_logits: ``(B, C, h, w)`` raw ``A``.
        tau: the bound.

    Returns:
        ``(B, C, h, w)`` in ``[0, tau]``.
    """
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    return F.hardtanh(cam_logits, 0.0, float(tau))


def slm_cam(cam_logits: Tensor, head: str = "wam", tau: float = TAU) -> Tensor:
    """The CAM the SLM regresses and exports: ``relu6(A)`` for ``wam``, ``relu(A)`` for ``cam`` (P1).

    Args:
        cam_logits: ``(B, C, h, w)`` raw ``A`` (also accepts any ``(N, C, h, w)`` inference batch).
        head: ``"wam"`` (intended SLM) or ``"cam"`` (network the released script trains).
        tau: bound of the ``wam`` head.

    Returns:
        ``(B, C, h, w)`` non-negative CAM.
    """
    _check_head(head)
    return bounded_cam(cam_logits, tau) if head == "wam" else F.relu(cam_logits)


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``MLSM(logits, y)``: multi-label soft-margin loss, mean over batch and classes (cls.md §2.1/§2.4)."""
    if logits.dim() != 2 or logits.shape != labels.shape:
        raise ValueError(
            f"logits and labels must both be (B, C), got {tuple(logits.shape)}, {tuple(labels.shape)}"
        )
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


# ----------------------------------------------------------------------------------------------------
# Seed-reactivation regression (§2.4)
# ----------------------------------------------------------------------------------------------------


def downsample_seeds(seeds: Tensor, size: tuple[int, int], mode: str = "nearest") -> Tensor:
    """Pseudo mask to the CAM size by nearest neighbour (cls.md §2.4, P5), values kept (255 stays 255).

    ``mode="nearest"`` is PyTorch's legacy nearest (source index ``floor(i * in / out)``: the top-left pixel
    of each 16 x 16 block for 512 -> 32); ``"nearest-exact"`` picks the block centre instead (PIL-style).
    Never majority/average pooling (parity, P5). A map already of ``size`` is returned unchanged.

    Args:
        seeds: ``(B, H, W)`` integer seed map.
        size: ``(h, w)``.
        mode: ``"nearest"`` or ``"nearest-exact"``.

    Returns:
        ``(B, h, w)`` int64.
    """
    if seeds.dim() != 3 or seeds.is_floating_point() or seeds.is_complex():
        raise ValueError(f"seeds must be an integer (B, H, W) map, got {seeds.dtype} {tuple(seeds.shape)}")
    if mode not in ("nearest", "nearest-exact"):
        raise ValueError(f"mode must be 'nearest' or 'nearest-exact', got {mode!r}")
    if tuple(seeds.shape[-2:]) == tuple(size):
        return seeds.long()
    # float32 holds 0..255 exactly; the interpolation only picks values
    return F.interpolate(seeds[:, None].float(), size=tuple(size), mode=mode)[:, 0].round().long()


def max_normalise(cam: Tensor) -> Tensor:
    """``cam / (per-class max over ALL spatial positions + 1e-5)`` (cls.md §2.4 A^, §2.2 GLM mixin).

    Not detached: gradient flows through the max (P4), also when the max sits on an ignored pixel.

    Args:
        cam: ``(B, C, h, w)`` non-negative maps.

    Returns:
        ``(B, C, h, w)`` in ``[0, 1)``; an all-zero channel stays 0.
    """
    _check_maps(cam, "cam")
    return cam / (torch.amax(cam, dim=(-2, -1), keepdim=True) + GSLM_EPS)


def seg_loss_terms(cam: Tensor, labels: Tensor, seeds: Tensor, scale: float = TAU) -> tuple[Tensor, Tensor]:
    """Per-(image, class) seed-regression losses of L_seg and which of them count (cls.md §2.4).

    ``term[b, c] = mean_{p in V_b} SmoothL1_{beta=1}(scale * A^_{b,c}[p], scale * 1[Y_b[p] = c + 1])`` with
    ``A^ = cam / (max over all pixels + 1e-5)`` (:func:`max_normalise`, P4) and ``V_b`` the non-255 pixels.
    ``counted[b, c]`` = class ``c`` is in the image labels and ``V_b`` is non-empty; uncounted terms are 0.

    Args:
        cam: ``(B, C, h, w)`` the CAM being regressed: ``relu6(A)`` (``wam``) or ``relu(A)`` (``cam``),
            see :func:`slm_cam`.
        labels: ``(B, C)`` foreground multi-hot image labels.
        seeds: ``(B, h, w)`` integer seed map at the CAM size (0 bg, c+1 class c, 255 ignore); see
            :func:`downsample_seeds`.
        scale: the regression scale (tau = 6: targets 6 on seeds of the class, 0 elsewhere).

    Returns:
        ``(terms, counted)``: ``(B, C)`` float losses (0 where not counted) and ``(B, C)`` bool.
    """
    _check_maps(cam, "cam")
    _check_labels(cam, labels)
    b, c, h, w = cam.shape
    if seeds.dim() != 3 or tuple(seeds.shape) != (b, h, w) or seeds.is_floating_point():
        raise ValueError(
            f"seeds must be an integer (B, h, w) = {(b, h, w)} map at the CAM size, got {seeds.dtype} "
            f"{tuple(seeds.shape)} (downsample_seeds resizes a full-size pseudo mask)"
        )
    seeds = seeds.to(device=cam.device, dtype=torch.long)
    if ((seeds < 0) | ((seeds > c) & (seeds != IGNORE_INDEX))).any():
        raise ValueError(f"seed values must lie in 0..{c} or be {IGNORE_INDEX}")
    valid = seeds != IGNORE_INDEX  # (B, h, w)
    classes = torch.arange(1, c + 1, device=cam.device).view(1, c, 1, 1)
    target = (seeds[:, None] == classes).to(cam.dtype) * scale  # (B, C, h, w)
    pred = max_normalise(cam) * scale
    loss = F.smooth_l1_loss(pred, target, reduction="none", beta=SMOOTH_L1_BETA)
    v = valid[:, None].to(cam.dtype)
    n_valid = v.sum(dim=(-2, -1))  # (B, 1)
    terms = (loss * v).sum(dim=(-2, -1)) / n_valid.clamp_min(1.0)
    counted = (labels > 0.5) & (n_valid > 0)
    return terms * counted.to(terms.dtype), counted


def seg_loss(
    cam: Tensor, labels: Tensor, seeds: Tensor, scale: float = TAU, reduction: str = "sum"
) -> Tensor:
    """Seed-reactivation regression L_seg (cls.md §2.4), UNWEIGHTED.

    ``reduction="sum"`` (official, P3): the sum over images and present classes of
    :func:`seg_loss_terms`; it grows with batch size and labels per image. ``"mean"`` (corrected, P3):
    divided by the number of counted (image, class) pairs. Images whose seeds are all 255 contribute 0;
    a batch of only such images gives a zero tensor (still attached to the graph), not a Python 0 (P13).

    Args:
        cam, labels, seeds, scale: see :func:`seg_loss_terms`.
        reduction: one of :data:`SEG_REDUCTIONS`.

    Returns:
        Scalar tensor.
    """
    if reduction not in SEG_REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(SEG_REDUCTIONS)}, got {reduction!r}")
    terms, counted = seg_loss_terms(cam, labels, seeds, scale)
    total = terms.sum()
    if reduction == "mean":
        total = total / counted.sum().clamp_min(1).to(total.dtype)
    return total


@float32
def slm_losses(
    logits: Tensor,
    cam_logits: Tensor,
    labels: Tensor,
    seeds: Tensor,
    head: str = "wam",
    seg_weight: float = SEG_LOSS_WEIGHT,
    tau: float = TAU,
    seg_reduction: str = "sum",
    seed_resize_mode: str = "nearest",
) -> dict[str, Tensor]:
    """The SLM training loss terms of cls.md §2.4 (``L_SLM = cls + seg``, summed by the caller).

    What the module passes:

    * ``logits``: the image logits ``(B, C)`` of its head (:meth:`lit_wsss.modules.GSLM.slm_logits`): the
      learned pooling ``Conv_{C->C, k x k}(AdaptiveAvgPool_{k x k}(A))`` for ``head="wam"`` (§2.4, P10),
      :func:`gap_logits` for ``head="cam"``.
    * ``cam_logits``: the RAW classifier map ``A = W . F`` ``(B, C, h, w)`` of the training crop (no ReLU,
      no bound; the module applies the backbone's stage-2 detach itself), e.g. ``self.classifier(feats)``.
    * ``labels``: the batch's ``(B, C)`` foreground multi-hot labels.
    * ``seeds``: the round's pseudo masks, cropped/flipped with the image, as ``(B, H, W)`` int64
      (0 bg, c+1 class c, 255 ignore AND crop padding); resized here to ``(h, w)`` by nearest (P5). A map
      already at ``(h, w)`` is used as is.
    * ``head``: ``"wam"`` = the intended SLM (ReLU6 CAM + learned pooling, default), ``"cam"`` = the network
      the released ``train_fuse_cam.py`` trains (ReLU CAM + GAP), pitfall P1.

    Args:
        logits: ``(B, C)``.
        cam_logits: ``(B, C, h, w)``.
        labels: ``(B, C)``.
        seeds: ``(B, H, W)`` or ``(B, h, w)`` integer.
        head: one of :data:`SLM_HEADS`.
        seg_weight: ``fuse_cam_seg_loss_rate`` (0.5).
        tau: ReLU6 bound and regression scale (6); the ``cam`` head uses it only as the regression scale.
        seg_reduction: ``"sum"`` (official) or ``"mean"`` (P3), see :func:`seg_loss`.
        seed_resize_mode: ``"nearest"`` (official) or ``"nearest-exact"``, see :func:`downsample_seeds`.

    Returns:
        ``{"cls": MLSM(logits, y), "seg": seg_weight * L_seg}`` scalar tensors.
    """
    _check_maps(cam_logits)
    _check_labels(cam_logits, labels)
    _check_head(head)
    if tuple(logits.shape) != tuple(labels.shape):
        raise ValueError(f"logits must be (B, C) = {tuple(labels.shape)}, got {tuple(logits.shape)}")
    if seeds.dim() != 3 or seeds.shape[0] != cam_logits.shape[0]:
        raise ValueError(f"seeds must be (B, H, W) with B = {cam_logits.shape[0]}, got {tuple(seeds.shape)}")
    small = downsample_seeds(seeds, tuple(cam_logits.shape[-2:]), seed_resize_mode)
    cam = slm_cam(cam_logits, head, tau)
    return {
        "cls": classification_loss(logits, labels),
        "seg": seg_weight * seg_loss(cam, labels, small, tau, seg_reduction),
    }


# ----------------------------------------------------------------------------------------------------
# Multi-scale CAMs (§2.2, §3)
# ----------------------------------------------------------------------------------------------------


def wam_normalise(summed: Tensor, num_maps: int, tau: float = TAU) -> Tensor:
    """WAM mixin normalisation: the MEAN of the ``num_maps`` summed maps divided by tau (cls.md §2.2, P2).

    Absolute scale: maps of bounded CAMs land in ``[0, 1]``; no per-image max.
    """
    if num_maps < 1 or not tau > 0:
        raise ValueError(f"num_maps must be >= 1 and tau > 0, got {num_maps}, {tau}")
    return summed / (num_maps * tau)


__all__ = [
    "GSLM_EPS",
    "LOSS_KEYS",
    "SEG_LOSS_WEIGHT",
    "SEG_REDUCTIONS",
    "SLM_HEADS",
    "SMOOTH_L1_BETA",
    "TAU",
    "WAM_POOL_SIZE",
    "bounded_cam",
    "classification_loss",
    "downsample_seeds",
    "gap_logits",
    "max_normalise",
    "seg_loss",
    "seg_loss_terms",
    "slm_cam",
    "slm_losses",
    "wam_normalise",
]
