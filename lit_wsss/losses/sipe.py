"""SIPE core: general CAM with background, structure-aware seeds, prototypes, IS-CAM and the GSC loss.

Pure functions of tensors (batch-first, no module state), reimplemented from
../shared/methods/sipe.md §2 (network forward), §3 (losses) and §8 (pitfalls); tests follow §10
items 1-5. Shapes use ``C`` foreground classes and ``K = C + 1`` channels with background at index 0::

    F     = cat[ R(n(s1)), ..., R(n(s4)) ]                 hierarchical_features      (§2)
    M     = relu(cam) / (spatial max + 1e-5)
    M_bg  = 1 - max_c M_c                                   (over ALL classes, §8 S2)
    Mh    = cat[M_bg, M] * V                                general_cam_with_background (§2)
    Q     = soft IoU(Cor, Mh), Q[0] *= 0.5                  structure_aware_seeds       (§2)
    seed  = onehot(argmax_k Q) * V
    P[k]  = sum_i seed[k, i] F[:, i] / hw                   prototypes (masked SUM / hw, §8 S4)
    S[k]  = relu(cos(F, P[k]))                              is_cam
    L_GSC = mean |Mh - S / (spatial max S + 1e-5)|          gsc_loss (§3, §8 S6)

The learnable parts (the 1x1 side convs, the classifier, the backbone and its detach points, §2/§8 S7)
belong to the module that calls these functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_wsss.precision import float32

#: SIPE's constant in every L2 norm and max normaliser (sipe.md §6).
SIPE_EPS = 1e-5
#: Factor applied to the background soft IoU before the seed argmax (sipe.md §2, §8 S3).
BACKGROUND_IOU_FACTOR = 0.5
#: Norm clamp of the cosine similarity (the default of :func:`torch.nn.functional.cosine_similarity`).
COSINE_EPS = 1e-8


def _l2_normalise_channels(x: Tensor) -> Tensor:
    """Per-pixel ``v / (||v|| + 1e-5)`` over dim 1."""
    return x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + SIPE_EPS)


def max_normalise(x: Tensor) -> Tensor:
    """``x / (spatial max of x + 1e-5)`` per image and channel (sipe.md §2 for M, §3 for Sh).

    Args:
        x: ``(B, K, h, w)`` non-negative maps.

    Returns:
        ``(B, K, h, w)``; an all-zero channel stays exactly 0.
    """
    return x / (torch.amax(x, dim=(-2, -1), keepdim=True) + SIPE_EPS)


def hierarchical_features(side_features: list[Tensor]) -> Tensor:
    """Hierarchical features ``F`` (sipe.md §2).

    Every side output is L2-normalised per pixel over channels (``v / (||v|| + 1e-5)``) *before* being
    bilinearly resized (``align_corners=False``, no antialiasing) to the spatial size of the THIRD side
    output; the blocks are then concatenated along channels. After resizing, up-/down-sampled blocks are
    no longer unit-norm (§8 S5). The side 1x1 convs themselves (and the detaches on their inputs) belong to
    the module.

    Args:
        side_features: ``[s1, s2, s3, s4, ...]``, each ``(B, C_i, h_i, w_i)``; SIPE: 128/128/256/256
            channels at strides 4/8/16/16.

    Returns:
        ``(B, sum C_i, h_3, w_3)`` (SIPE: ``(B, 768, h, w)``).
    """
    if len(side_features) < 3:
        raise ValueError(
            f"need at least 3 side outputs (resize target is the third), got {len(side_features)}"
        )
    size = tuple(side_features[2].shape[-2:])
    blocks = []
    for s in side_features:
        n = _l2_normalise_channels(s)
        if tuple(n.shape[-2:]) != size:
            n = F.interpolate(n, size=size, mode="bilinear", align_corners=False, antialias=False)
        blocks.append(n)
    return torch.cat(blocks, dim=1)


def valid_mask(in_image: Tensor, labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Valid mask ``V`` (sipe.md §2): channel 0 = in-image, channel ``c`` = in-image * ``y_c``.

    The spec builds the full-resolution ``(C+1, H, W)`` map, multiplies channels ``1..C`` by the label and
    nearest-resizes it; since nearest resizing commutes with per-channel scalars, the in-image map is
    resized first (same result, less memory). Resizing uses ``mode="nearest"`` (PyTorch's legacy nearest).

    Args:
        in_image: ``(B, H, W)`` bool/float, 1 on pixels of the crop that come from the image (0 on padding).
        labels: ``(B, C)`` multi-hot image labels.
        size: ``(h, w)`` feature-map size.

    Returns:
        ``(B, C+1, h, w)`` float mask.
    """
    if in_image.dim() != 3 or labels.dim() != 2 or in_image.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected in_image (B,H,W) and labels (B,C), got {tuple(in_image.shape)}, {tuple(labels.shape)}"
        )
    dtype = labels.dtype if labels.is_floating_point() else torch.get_default_dtype()
    inside = in_image.to(dtype)[:, None]
    if tuple(inside.shape[-2:]) != tuple(size):
        inside = F.interpolate(inside, size=tuple(size), mode="nearest")
    y = torch.cat([torch.ones_like(labels[:, :1], dtype=dtype), labels.to(dtype)], dim=1)  # (B, C+1)
    return inside * y[:, :, None, None]


def general_cam_with_background(cam_logits: Tensor, valid: Tensor | None = None) -> Tensor:
    """General CAM with a background channel ``Mh`` (sipe.md §2).

    ``M = relu(cam) / (spatial max + 1e-5)``; ``M_bg = 1 - max_c M_c`` where the max runs over ALL ``C``
    classes, present or not (quirk kept on purpose, §8 S2); ``Mh = cat[M_bg, M] * V``. Max-normalisation
    happens before the background is built and before masking (§8 S5).

    Args:
        cam_logits: ``(B, C, h, w)`` raw classifier outputs.
        valid: ``(B, C+1, h, w)`` valid mask (:func:`valid_mask`), or anything broadcastable to it
            (e.g. ``(B, C+1, 1, 1)``); ``None`` = no masking (inference, §5.1).

    Returns:
        ``(B, C+1, h, w)``.
    """
    m = max_normalise(F.relu(cam_logits))
    m_bg = 1.0 - torch.amax(m, dim=1, keepdim=True)
    mh = torch.cat([m_bg, m], dim=1)
    return mh if valid is None else mh * valid.to(mh.dtype)


def soft_iou(mh: Tensor, deep_features: Tensor) -> Tensor:
    """Unhalved soft IoU between each pixel's correlation map and each channel of ``Mh`` (sipe.md §2).

    ``f`` = per-pixel L2-normalised features (``+1e-5``), ``Cor = relu(f^T f)``,
    ``I[k,i] = sum_j Cor[i,j] Mh[k,j]``, ``U[k,i] = sum_j Cor[i,j] + sum_j Mh[k,j] - I[k,i]``, ``Q = I/U``.
    ``I`` is a batched matmul (§8 S16) instead of the official ``(B, K, hw, hw)`` broadcast. The only
    deviation: an undefined ``0/0`` (an all-zero feature pixel against an all-zero channel) is set to 0
    instead of NaN.

    Args:
        mh: ``(B, K, h, w)``.
        deep_features: ``(B, D, h, w)`` (x4 in training, fused ``F`` at inference, §8 S1).

    Returns:
        ``(B, K, h, w)`` in [0, 1].
    """
    b, k, h, w = mh.shape
    if deep_features.shape[0] != b or tuple(deep_features.shape[-2:]) != (h, w):
        raise ValueError(f"features {tuple(deep_features.shape)} do not match Mh {tuple(mh.shape)}")
    f = _l2_normalise_channels(deep_features.to(mh.dtype)).reshape(b, -1, h * w)  # (B, D, hw)
    cor = F.relu(torch.bmm(f.transpose(1, 2), f))  # (B, hw, hw)
    m = mh.reshape(b, k, h * w)
    inter = torch.bmm(m, cor.transpose(1, 2))  # I[k, i] = sum_j M[k, j] Cor[i, j]
    union = cor.sum(-1)[:, None, :] + m.sum(-1, keepdim=True) - inter
    q = torch.where(
        union > 0, inter / torch.where(union > 0, union, torch.ones_like(union)), torch.zeros_like(inter)
    )
    return q.reshape(b, k, h, w)


def structure_aware_seeds(mh: Tensor, valid: Tensor, deep_features: Tensor) -> tuple[Tensor, Tensor]:
    """Structure-aware seed locating (sipe.md §2, ``get_seed``).

    ``Q`` = :func:`soft_iou`, then ``Q[:, 0] *= 0.5`` (background halved, §8 S3), and
    ``seed[k, i] = 1[k = argmax_k' Q[k', i]] * V[k, i]`` (ties -> lowest index). Computed without
    gradient: the seeds (and the returned ``Q``) are detached (§8 S7).

    Args:
        mh: ``(B, K, h, w)`` general CAM with background.
        valid: ``(B, K, h, w)`` valid mask or anything broadcastable to it (inference: ``y' = (1, y)``
            as ``(B, K, 1, 1)``).
        deep_features: ``(B, D, h, w)`` correlation features.

    Returns:
        ``(seeds, q)``: float one-hot-or-zero seeds ``(B, K, h, w)`` and the halved soft IoU ``(B, K, h, w)``.
    """
    with torch.no_grad():
        q = soft_iou(mh.detach(), deep_features.detach())
        q[:, 0] = q[:, 0] * BACKGROUND_IOU_FACTOR
        seeds = F.one_hot(q.argmax(dim=1), num_classes=q.shape[1]).permute(0, 3, 1, 2).to(mh.dtype)
        seeds = seeds * valid.to(mh.dtype)
    return seeds, q


def prototypes(seeds: Tensor, features: Tensor) -> Tensor:
    """Background-aware prototypes ``P[k] = (1/hw) sum_i seed[k,i] F[:, i]`` (sipe.md §2).

    A masked SUM divided by ``h*w``, not a masked mean (quirk kept, §8 S4); a class without seeds gets an
    exactly-zero prototype.

    Args:
        seeds: ``(B, K, h, w)`` (no gradient expected).
        features: ``(B, F, h, w)`` hierarchical features.

    Returns:
        ``(B, K, F)``.
    """
    b, k, h, w = seeds.shape
    if features.shape[0] != b or tuple(features.shape[-2:]) != (h, w):
        raise ValueError(f"features {tuple(features.shape)} do not match seeds {tuple(seeds.shape)}")
    s = seeds.to(features.dtype).reshape(b, k, h * w)
    return torch.bmm(s, features.reshape(b, -1, h * w).transpose(1, 2)) / (h * w)


def is_cam(features: Tensor, prototypes: Tensor) -> Tensor:
    """Image-specific CAM ``S[k, i] = relu(cos(F[:, i], P[k]))`` (sipe.md §2, ``reactivate``).

    Cosine as :func:`torch.nn.functional.cosine_similarity` (each norm clamped at ``1e-8``), written as
    a matmul; a zero prototype gives exactly 0 (no NaN). The result is NOT max-normalised (that happens
    only in the loss, §8 S5) and not masked by ``V`` (§8 S6).

    Args:
        features: ``(B, F, h, w)``.
        prototypes: ``(B, K, F)`` (:func:`prototypes`).

    Returns:
        ``(B, K, h, w)``.
    """
    protos = prototypes
    b, c, h, w = features.shape
    if protos.shape[0] != b or protos.shape[2] != c:
        raise ValueError(f"prototypes {tuple(protos.shape)} do not match features {tuple(features.shape)}")
    f = features.reshape(b, c, h * w)
    f = f / torch.linalg.vector_norm(f, dim=1, keepdim=True).clamp_min(COSINE_EPS)
    p = protos / torch.linalg.vector_norm(protos, dim=2, keepdim=True).clamp_min(COSINE_EPS)
    return F.relu(torch.bmm(p, f)).reshape(b, protos.shape[1], h, w)


@float32
def gsc_loss(mh: Tensor, is_cam: Tensor) -> Tensor:
    """General-Specific Consistency loss (sipe.md §3).

    ``mean_{b,k,i} |Mh - Sh|`` with ``Sh = S / (spatial max S + 1e-5)``: a plain mean over all
    ``B * K * h * w`` entries, absent classes and padding pixels included (§8 S6).

    Args:
        mh: ``(B, K, h, w)`` general CAM with background.
        is_cam: ``(B, K, h, w)`` raw IS-CAM (:func:`is_cam`).

    Returns:
        Scalar tensor.
    """
    s = is_cam
    if mh.shape != s.shape:
        raise ValueError(f"Mh {tuple(mh.shape)} and IS-CAM {tuple(s.shape)} differ")
    return (mh - max_normalise(s)).abs().mean()
