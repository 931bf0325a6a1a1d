"""CPN core: the correlation head (D, region gather, PRCM, PCM) and the CP / CPR / CPCR losses.

Pure functions of tensors (batch-first, no module state: the 1x1 conv weights are passed in as tensors),
reimplemented from ../shared/methods/cpn.md §3 (head), §5 (losses) and §10 (pitfalls C2-C8); tests
follow §12 items 2-7. Shapes: ``K = C + 1`` channels with background at index 0, ``hw = h * w`` feature
positions, ``(H, W)`` the full input size::

    D      = WTA_fg( relu(cam - 1e-5 after relu) / (max + 1e-5) ), D[0] = 1 - max_{k>=1} D[k]   (§3, C8)
    f      = cat[ bilinear_ac(x -> h x w), relu(f8_3 tap), relu(f8_4 tap) ]                   head_features
    Rg[k]  = sum_i softmax_i(D[k, i]) f[:, i]                                                 spatial_gather
    Q      = relu(f9 f),  Kt = relu(f10 Rg) laid out (B, 192, K, 1),  Kr = Kt.reshape(B, K, 192)  (C7)
    P[k]   = softmax_i( (Kr Q)[k, i] / sqrt(K) )                                              prcm
    G      = f9 f / (||f9 f|| + 1e-5),  A = relu(G^T G),  A[i, j] /= (sum_i A[i, j] + 1e-5)
    Y      = D A                                                                              pcm
    cam_rv = Y + P * D                                                                        refined_cam

    N(p)   = relu(p+ - min p+ - 1e-5) / (max p+ - min p+ + 1e-5),  p+ = relu(p)              (§5, C4)
    c^_0 = N(c0) y,  c^_1 = rho N(c1) y,  c^_2 = (1 - rho) N(c2) y   (same for r^)            (C2)
    L_cls  = 1/3 sum_t MLSM(GAP(c_t)[1:], y[1:]) + 1/3 sum_t Lmin((r_t y)[1:])
    L_cp   = mean_{b, k>=1, i} | sg(c^_1 + c^_2) - c^_0 |                                     (C3)
    L_cpr  = mean_{b, k>=1, i} | r^_0 - r^_1 - r^_2 |
    then channel 0 := 1 - max_{k>=1} on all six maps (a new tensor, after the CP losses)     (C5)
    L_cpcr = sum_{E in (E1, E2)} mean_b mean(top-k of E_b),  k = int(0.2 K H W)              (C6)
             E1 = | WTA(sg(c^_0 - c^_1)) - r^_2 |,  E2 = | WTA(sg(c^_0 - c^_2)) - r^_1 |

Labels are the batch convention of the datamodules: ``(B, C)`` multi-hot over the FOREGROUND classes;
``y = cat[1, labels]`` (background always on) is built here. The learnable layers (fc8, f8_3, f8_4, the
``.detach()`` on the backbone taps, f9/f10 as parameters) belong to the module that calls these
functions; gradient reaches f9/f10 only through :func:`refined_cam` and never through ``D`` (§3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_wsss.precision import float32

#: CPN's constant in the CAM normalisations, the PCM L2 norm and the affinity normalisation (cpn.md §8).
CPN_EPS = 1e-5
#: Fraction of ``K * H * W`` entries kept per image by the OHEM of L_cpcr (cpn.md §5, §10 C6).
OHEM_RATIO = 0.2
#: Fraction of ``H * W`` pixels pooled by the min-pooling term of L_cls (cpn.md §5).
MIN_POOL_FRACTION = 0.25
#: Names of the loss terms returned by :func:`cpn_losses` (all weights 1; the caller sums them).
LOSS_KEYS = ("cls", "cp", "cpr", "cpcr")


# ----------------------------------------------------------------------------------------------------
# Elementwise helpers (§5)
# ----------------------------------------------------------------------------------------------------


def min_max_normalise(p: Tensor) -> Tensor:
    """``N(p)`` of cpn.md §5 (``tool/visualization.py`` max_norm), per image and channel over space.

    ``p+ = relu(p)``; ``N(p) = relu(p+ - min p+ - 1e-5) / (max p+ - min p+ + 1e-5)`` with min/max over
    the spatial positions of each ``(b, k)``. Outputs lie in ``[0, 1)``; a spatially constant channel maps
    to exactly 0 (a min-max normalisation, not the max-only one of IRN/SIPE, C4). Differentiable.

    Args:
        p: ``(B, K, H, W)``.

    Returns:
        ``(B, K, H, W)``.
    """
    if p.dim() != 4:
        raise ValueError(f"expected (B, K, H, W), got {tuple(p.shape)}")
    pos = F.relu(p)
    lo = torch.amin(pos, dim=(-2, -1), keepdim=True)
    hi = torch.amax(pos, dim=(-2, -1), keepdim=True)
    return F.relu(pos - lo - CPN_EPS) / (hi - lo + CPN_EPS)


def winner_take_all(z: Tensor, dim: int = 1) -> Tensor:
    """Keep the values equal to the maximum along ``dim`` (ties all kept), zero elsewhere (§5 WTA).

    The kept entries keep their magnitude (not a one-hot, C5). The mask is built without gradient;
    gradient flows to the kept entries.

    Args:
        z: any tensor, e.g. ``(B, K, H, W)`` with channels on ``dim``.
        dim: the dimension the maximum runs over.

    Returns:
        Tensor of the same shape.
    """
    keep = z == torch.amax(z.detach(), dim=dim, keepdim=True)
    return z * keep.to(z.dtype)


def _with_background(z: Tensor) -> Tensor:
    """A NEW tensor equal to ``z`` with channel 0 replaced by ``1 - max_{k>=1} z[k]`` (§5, C5)."""
    return torch.cat([1.0 - torch.amax(z[:, 1:], dim=1, keepdim=True), z[:, 1:]], dim=1)


# ----------------------------------------------------------------------------------------------------
# Head (§3)
# ----------------------------------------------------------------------------------------------------


def correlation_cam(cam_logits: Tensor) -> Tensor:
    """The CAM ``D`` fed to PCM and PRCM (cpn.md §3, C8), computed without gradient.

    ``c = relu(cam)``; ``c = relu(c - 1e-5) / (spatial max of c + 1e-5)``; ``c[0] = 1 - max_{k>=1} c[k]``
    (the input's channel 0 is discarded); foreground winner-take-all: ``c[k>=1] = 0`` where
    ``c[k] < max_{k'>=1} c[k']`` (ties kept, values kept). NOT label-masked.

    Args:
        cam_logits: ``(B, K, h, w)`` raw fc8 outputs (channel 0 = "background").

    Returns:
        ``(B, K, h, w)`` detached, in ``[0, 1]``.
    """
    if cam_logits.dim() != 4 or cam_logits.shape[1] < 2:
        raise ValueError(f"expected (B, K>=2, h, w), got {tuple(cam_logits.shape)}")
    with torch.no_grad():
        c = F.relu(cam_logits.detach())
        c = F.relu(c - CPN_EPS) / (torch.amax(c, dim=(-2, -1), keepdim=True) + CPN_EPS)
        fg = winner_take_all(c[:, 1:], dim=1)
        bg = 1.0 - torch.amax(c[:, 1:], dim=1, keepdim=True)
        return torch.cat([bg, fg], dim=1)


def head_features(image: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """The correlation features ``f`` of cpn.md §3: ``cat[bilinear(x -> h x w), relu(low), relu(high)]``.

    The image is resized with ``align_corners=True``. ``low``/``high`` are the ALREADY PROJECTED taps,
    ``f8_3(conv4.detach())`` and ``f8_4(conv5.detach())`` (the module owns those convs and the detaches);
    the ReLU is applied here (idempotent if the caller already applied it). They must already have the
    size ``(h, w)`` of the CAM (for a backbone whose taps differ in stride, the module resizes them).

    Args:
        image: ``(B, 3, H, W)`` normalised input.
        low: ``(B, C1, h, w)`` (ResNet-38: 64 channels).
        high: ``(B, C2, h, w)`` (ResNet-38: 128 channels).

    Returns:
        ``(B, 3 + C1 + C2, h, w)`` (ResNet-38: 195 channels).
    """
    if image.dim() != 4 or low.dim() != 4 or high.dim() != 4:
        raise ValueError("image, low and high must be 4-D (B, C, H, W)")
    size = tuple(low.shape[-2:])
    if tuple(high.shape[-2:]) != size or not (image.shape[0] == low.shape[0] == high.shape[0]):
        raise ValueError(
            f"taps must share batch and size, got {tuple(low.shape)} and {tuple(high.shape)}"
            f" for image {tuple(image.shape)}"
        )
    x = F.interpolate(image.to(low.dtype), size=size, mode="bilinear", align_corners=True)
    return torch.cat([x, F.relu(low), F.relu(high)], dim=1)


def spatial_gather(d: Tensor, f: Tensor) -> Tensor:
    """Region features ``Rg = softmax_i(D[k, i]) . f^T`` (cpn.md §3, SpatialGather, scale 1).

    The softmax runs over the ``hw`` positions of each channel of ``D`` (values in [0, 1], so the
    weights are close to uniform; reproduced as is).

    Args:
        d: ``(B, K, h, w)`` the correlation CAM (:func:`correlation_cam`).
        f: ``(B, Cf, h, w)`` head features (:func:`head_features`).

    Returns:
        ``(B, K, Cf)``; the official code stores the same numbers as ``(B, Cf, K, 1)``.
    """
    b, k = d.shape[:2]
    if f.shape[0] != b or tuple(f.shape[-2:]) != tuple(d.shape[-2:]):
        raise ValueError(f"features {tuple(f.shape)} do not match D {tuple(d.shape)}")
    weights = torch.softmax(d.reshape(b, k, -1).to(f.dtype), dim=-1)  # (B, K, hw)
    return torch.bmm(weights, f.reshape(b, f.shape[1], -1).transpose(1, 2))


#: A bias-free 1x1 convolution ``(B, I, h, w) -> (B, O, h, w)``: the module's ``f9`` / ``f10`` layers.
Conv1x1 = Callable[[Tensor], Tensor]


def prcm(region: Tensor, f: Tensor, f9: Conv1x1, f10: Conv1x1, key_transpose: bool = False) -> Tensor:
    """Pixel-region correlation map ``P`` (cpn.md §3, §10 C7).

    ``Q = relu(f9 f)`` ``(B, O, hw)``; ``Kt = relu(f10 Rg)`` with the official layout ``(B, O, K, 1)``
    (``Kt[b, o, k]``); the key is that memory REINTERPRETED as ``(B, K, O)``:
    ``Kr[b, k', c'] = Kt[b, (k' O + c') // K, (k' O + c') % K]`` (a reshape, which scrambles classes and
    channels; ``key_transpose=True`` uses the transpose ``Kr[b, k, o] = Kt[b, o, k]`` instead).
    ``P[k] = softmax_i( (Kr Q)[k, i] / sqrt(K) )`` with ``K`` the number of channels of ``D``.

    Args:
        region: ``(B, K, Cf)`` region features (:func:`spatial_gather`).
        f: ``(B, Cf, h, w)`` head features.
        f9: the query layer ``Cf -> O`` (shared with :func:`pcm`).
        f10: the key layer ``Cf -> O``, applied to the regions laid out as ``(B, Cf, K, 1)`` (official).
        key_transpose: False = official reshape (default), True = the transpose.

    Returns:
        ``(B, K, h, w)``, non-negative, summing to 1 over positions for every ``(b, k)``.
    """
    b, k, cf = region.shape
    if f.shape[0] != b or f.shape[1] != cf or f.dim() != 4:
        raise ValueError(f"features {tuple(f.shape)} do not match region features {tuple(region.shape)}")
    h, w = f.shape[-2:]
    query = F.relu(f9(f)).reshape(b, -1, h * w)  # (B, O, hw)
    key_t = F.relu(f10(region.transpose(1, 2)[..., None])).reshape(b, -1, k).contiguous()  # (B, O, K)
    key = key_t.transpose(1, 2) if key_transpose else key_t.reshape(b, k, -1)  # (B, K, O)
    energy = torch.bmm(key, query) / math.sqrt(k)
    return torch.softmax(energy, dim=-1).reshape(b, k, h, w)


def pcm_affinity(f: Tensor, f9: Conv1x1) -> Tensor:
    """Column-normalised affinity ``A`` of PCM (cpn.md §3).

    ``G = f9 f`` (no ReLU), per-pixel L2-normalised (``+1e-5``); ``A = relu(G^T G)``;
    ``A[i, j] /= (sum_i A[i, j] + 1e-5)``.

    Args:
        f: ``(B, Cf, h, w)`` head features.
        f9: the query layer ``Cf -> O``.

    Returns:
        ``(B, hw, hw)``; every column sums to ``s / (s + 1e-5)`` (≈ 1) or is all zero.
    """
    g = f9(f).flatten(2)  # (B, O, hw)
    g = g / (torch.linalg.vector_norm(g, dim=1, keepdim=True) + CPN_EPS)
    a = F.relu(torch.bmm(g.transpose(1, 2), g))
    return a / (a.sum(dim=1, keepdim=True) + CPN_EPS)


def pcm(d: Tensor, f: Tensor, f9: Conv1x1) -> Tensor:
    """Pixel correlation module ``Y = D . A``, ``Y[k, j] = sum_i D[k, i] A[i, j]`` (cpn.md §3).

    Args:
        d: ``(B, K, h, w)`` correlation CAM.
        f: ``(B, Cf, h, w)`` head features.
        f9: the query layer ``Cf -> O``.

    Returns:
        ``(B, K, h, w)``.
    """
    b, k, h, w = d.shape
    if f.shape[0] != b or tuple(f.shape[-2:]) != (h, w):
        raise ValueError(f"features {tuple(f.shape)} do not match D {tuple(d.shape)}")
    a = pcm_affinity(f, f9)
    return torch.bmm(d.reshape(b, k, h * w).to(a.dtype), a).reshape(b, k, h, w)


def refined_cam(
    cam_logits: Tensor,
    image: Tensor,
    low: Tensor,
    high: Tensor,
    f9: Conv1x1,
    f10: Conv1x1,
    key_transpose: bool = False,
) -> Tensor:
    """The whole §3 head: ``cam_rv = PCM(D, f) + PRCM(Rg, f) * D`` at the CAM resolution.

    ``D`` = :func:`correlation_cam` (no gradient), ``f`` = :func:`head_features` (image resized with
    ``align_corners=True``, ``low``/``high`` = the projected taps ``f8_3(conv4.detach())`` and
    ``f8_4(conv5.detach())``), ``Rg`` = :func:`spatial_gather`. Upsample the result (and the raw CAM) to
    the input size with :func:`upsample` before the losses.

    Args:
        cam_logits: ``(B, K, h, w)`` raw fc8 outputs.
        image: ``(B, 3, H, W)`` normalised input.
        low: ``(B, C1, h, w)`` projected low tap.
        high: ``(B, C2, h, w)`` projected high tap.
        f9, f10: the query and key layers ``3 + C1 + C2 -> O`` (the module's ``f9`` / ``f10``).
        key_transpose: see :func:`prcm`.

    Returns:
        ``(B, K, h, w)``.
    """
    if tuple(low.shape[-2:]) != tuple(cam_logits.shape[-2:]) or low.shape[0] != cam_logits.shape[0]:
        raise ValueError(f"taps {tuple(low.shape)} do not match the CAM {tuple(cam_logits.shape)}")
    d = correlation_cam(cam_logits)
    f = head_features(image, low, high)
    d = d.to(f.dtype)
    p = prcm(spatial_gather(d, f), f, f9, f10, key_transpose=key_transpose)
    return pcm(d, f, f9) + p * d


def upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with ``align_corners=True`` (the head's output resize to the input size, §3)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


# ----------------------------------------------------------------------------------------------------
# Losses (§5)
# ----------------------------------------------------------------------------------------------------


def _check_labels(maps: Tensor, labels: Tensor) -> Tensor:
    """Validate ``(B, C)`` fg labels against ``(B, C+1, H, W)`` maps; return ``y`` as ``(B, C+1, 1, 1)``."""
    if maps.dim() != 4:
        raise ValueError(f"expected maps (B, K, H, W), got {tuple(maps.shape)}")
    b, k = maps.shape[:2]
    if labels.dim() != 2 or tuple(labels.shape) != (b, k - 1):
        raise ValueError(
            f"labels must be (B, C) = ({b}, {k - 1}) foreground multi-hot (background is added here),"
            f" got {tuple(labels.shape)}"
        )
    y = labels.to(maps.dtype)
    return torch.cat([torch.ones_like(y[:, :1]), y], dim=1)[:, :, None, None]


def _check_triplet(maps: Sequence[Tensor], name: str) -> None:
    if len(maps) != 3:
        raise ValueError(f"{name} must hold the three passes (x, x1, x2), got {len(maps)}")
    shape = tuple(maps[0].shape)
    if len(shape) != 4 or any(tuple(m.shape) != shape for m in maps):
        raise ValueError(
            f"{name} must be three (B, K, H, W) tensors of one shape, got {[tuple(m.shape) for m in maps]}"
        )


def _check_rho(rho: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """``rho`` as a ``(B, 1, 1, 1)`` tensor of ``like``'s dtype/device."""
    r = torch.as_tensor(rho, dtype=like.dtype, device=like.device)
    if r.dim() == 0:
        r = r.expand(batch)
    if tuple(r.shape) != (batch,):
        raise ValueError(f"rho must be (B,) = ({batch},), got {tuple(r.shape)}")
    return r.reshape(batch, 1, 1, 1)


def pair_weighted_maps(
    maps: Sequence[Tensor], rho: Tensor | float, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``(N(m0) y, rho N(m1) y, (1 - rho) N(m2) y)`` of cpn.md §5 (C2: rho after normalising and masking).

    Args:
        maps: the three passes ``(m0, m1, m2)`` (raw CAMs ``c_t`` or refined CAMs ``r_t``), each
            ``(B, K, H, W)`` at full input resolution.
        rho: ``(B,)`` fraction of pixels kept in ``x1`` (a scalar is broadcast).
        labels: ``(B, C)`` foreground multi-hot labels, ``C = K - 1``.

    Returns:
        Three ``(B, K, H, W)`` tensors (channel 0 is still ``N(m_t[0])`` scaled; see :func:`cpcr_loss`).
    """
    _check_triplet(maps, "maps")
    y = _check_labels(maps[0], labels)
    r = _check_rho(rho, maps[0].shape[0], maps[0])
    m0, m1, m2 = (min_max_normalise(m) * y for m in maps)
    return m0, r * m1, (1.0 - r) * m2


def min_pool_loss(z: Tensor, fraction: float = MIN_POOL_FRACTION) -> Tensor:
    """Adaptive min-pooling loss ``Lmin`` of cpn.md §5.

    ``m_b,i = max_k z_b,k,i``; ``Lmin = sum_b sum_{i in lowest k of m_b} relu(m_b,i) / (k B)`` with
    ``k = int(fraction * H * W)`` (``H*W // 4`` by default).

    Args:
        z: ``(B, C, H, W)`` (CPN: ``(r_t * y)[:, 1:]``).
        fraction: share of pixels pooled.

    Returns:
        Scalar tensor.
    """
    if z.dim() != 4:
        raise ValueError(f"expected (B, C, H, W), got {tuple(z.shape)}")
    b, _, h, w = z.shape
    k = int(fraction * h * w)
    if not 1 <= k <= h * w:
        raise ValueError(f"fraction {fraction} keeps {k} of {h * w} pixels")
    peak = torch.amax(z, dim=1).reshape(b, h * w)
    lowest = torch.topk(peak, k, dim=1, largest=False).values
    return F.relu(lowest).sum() / (k * b)


def classification_loss(
    cams: Sequence[Tensor],
    refined: Sequence[Tensor],
    labels: Tensor,
    min_pool_fraction: float = MIN_POOL_FRACTION,
) -> Tensor:
    """``L_cls`` of cpn.md §5, averaged over the given passes (CPN: the three passes x, x1, x2).

    ``mean_t MLSM(GAP(c_t)[:, 1:], y[1:]) + mean_t Lmin((r_t * y)[:, 1:])``; GAP over the full-resolution
    CAM; channel 0 of ``c_t`` receives no gradient from this loss.

    Args:
        cams: raw CAMs ``c_t``, each ``(B, K, H, W)``.
        refined: refined CAMs ``r_t``, same shapes.
        labels: ``(B, C)`` foreground multi-hot labels.
        min_pool_fraction: see :func:`min_pool_loss`.

    Returns:
        Scalar tensor.
    """
    if len(cams) == 0 or len(cams) != len(refined):
        raise ValueError(f"need as many refined maps as CAMs (>= 1), got {len(cams)} and {len(refined)}")
    total = cams[0].new_zeros(())
    for c, r in zip(cams, refined):
        if c.shape != r.shape:
            raise ValueError(f"CAM {tuple(c.shape)} and refined CAM {tuple(r.shape)} differ")
        y = _check_labels(c, labels)
        score = torch.mean(c[:, 1:], dim=(-2, -1))
        total = total + F.multilabel_soft_margin_loss(score, y[:, 1:, 0, 0])
        total = total + min_pool_loss((r * y)[:, 1:], min_pool_fraction)
    return total / len(cams)


def cp_loss(c0_hat: Tensor, c1_hat: Tensor, c2_hat: Tensor) -> Tensor:
    """``L_cp = mean_{b, k>=1, i} |sg(c^_1 + c^_2) - c^_0|``: only the x-branch learns (cpn.md §5, C3).

    Args:
        c0_hat, c1_hat, c2_hat: :func:`pair_weighted_maps` of the raw CAMs, ``(B, K, H, W)``.

    Returns:
        Scalar tensor.
    """
    _check_triplet((c0_hat, c1_hat, c2_hat), "CP maps")
    return ((c1_hat + c2_hat).detach()[:, 1:] - c0_hat[:, 1:]).abs().mean()


def cpr_loss(r0_hat: Tensor, r1_hat: Tensor, r2_hat: Tensor) -> Tensor:
    """``L_cpr = mean_{b, k>=1, i} |r^_0 - r^_1 - r^_2|``, no detach: all three branches learn (§5, C3).

    Args:
        r0_hat, r1_hat, r2_hat: :func:`pair_weighted_maps` of the refined CAMs, ``(B, K, H, W)``.

    Returns:
        Scalar tensor.
    """
    _check_triplet((r0_hat, r1_hat, r2_hat), "CPR maps")
    return (r0_hat[:, 1:] - r1_hat[:, 1:] - r2_hat[:, 1:]).abs().mean()


def _ohem_mean(e: Tensor, ratio: float) -> Tensor:
    """Mean over images of the mean of the ``int(ratio * K * H * W)`` largest entries of each image."""
    b = e.shape[0]
    flat = e.reshape(b, -1)
    k = int(ratio * flat.shape[1])
    if not 1 <= k <= flat.shape[1]:
        raise ValueError(f"ohem_ratio {ratio} keeps {k} of {flat.shape[1]} entries per image")
    return torch.topk(flat, k, dim=1).values.mean()


def cpcr_loss(c_hat: Sequence[Tensor], r_hat: Sequence[Tensor], ohem_ratio: float = OHEM_RATIO) -> Tensor:
    """CP cross-regularisation ``L_cpcr`` of cpn.md §5 (C3, C5, C6).

    Takes the maps of :func:`pair_weighted_maps` BEFORE the background overwrite and performs it here
    on new tensors (channel 0 := ``1 - max_{k>=1}``, gradient flowing through the max for the refined
    maps), so calling it after :func:`cp_loss` / :func:`cpr_loss` on the same inputs reproduces the
    official order. Then ``E1 = |WTA(sg(c^_0 - c^_1)) - r^_2|``, ``E2 = |WTA(sg(c^_0 - c^_2)) - r^_1|``
    (WTA over all ``K`` channels, magnitudes kept) and, for each ``E``, the mean of the top
    ``int(ratio * K * H * W)`` entries of each image (all channels, absent classes included), averaged
    over images; the two terms are summed. The raw-CAM targets are detached; ``r^_0`` is unused.

    Args:
        c_hat: ``(c^_0, c^_1, c^_2)``, each ``(B, K, H, W)``.
        r_hat: ``(r^_0, r^_1, r^_2)``, same shapes.
        ohem_ratio: share of ``K * H * W`` entries kept per image.

    Returns:
        Scalar tensor.
    """
    _check_triplet(c_hat, "c_hat")
    _check_triplet(r_hat, "r_hat")
    if c_hat[0].shape != r_hat[0].shape:
        raise ValueError(f"c_hat {tuple(c_hat[0].shape)} and r_hat {tuple(r_hat[0].shape)} differ")
    c0, c1, c2 = (_with_background(c.detach()) for c in c_hat)
    _, r1, r2 = (_with_background(r) for r in r_hat)
    e1 = (winner_take_all(c0 - c1) - r2).abs()
    e2 = (winner_take_all(c0 - c2) - r1).abs()
    return _ohem_mean(e1, ohem_ratio) + _ohem_mean(e2, ohem_ratio)


@float32
def cpn_losses(
    cams: Sequence[Tensor],
    refined: Sequence[Tensor],
    rho: Tensor | float,
    labels: Tensor,
    ohem_ratio: float = OHEM_RATIO,
    min_pool_fraction: float = MIN_POOL_FRACTION,
) -> dict[str, Tensor]:
    """All CPN loss terms of cpn.md §5 (weights 1; ``L = cls + cp + cpr + cpcr``, summed by the caller).

    Args:
        cams: ``(c0, c1, c2)`` raw CAMs of x, x1, x2, each ``(B, K, H, W)`` at full input resolution.
        refined: ``(r0, r1, r2)`` refined CAMs, same shapes.
        rho: ``(B,)`` fraction of kept pixels of x1 (grid strategy: kept cells).
        labels: ``(B, C)`` foreground multi-hot labels, ``C = K - 1``.
        ohem_ratio: see :func:`cpcr_loss`.
        min_pool_fraction: see :func:`min_pool_loss`.

    Returns:
        ``{"cls", "cp", "cpr", "cpcr"}`` scalar tensors.
    """
    _check_triplet(cams, "cams")
    _check_triplet(refined, "refined")
    if cams[0].shape != refined[0].shape:
        raise ValueError(f"cams {tuple(cams[0].shape)} and refined {tuple(refined[0].shape)} differ")
    c_hat = pair_weighted_maps(cams, rho, labels)
    r_hat = pair_weighted_maps(refined, rho, labels)
    return {
        "cls": classification_loss(cams, refined, labels, min_pool_fraction),
        "cp": cp_loss(*c_hat),
        "cpr": cpr_loss(*r_hat),
        "cpcr": cpcr_loss(c_hat, r_hat, ohem_ratio),
    }
