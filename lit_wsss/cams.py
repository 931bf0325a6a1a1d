"""Class activation maps: multi-scale + flip inference and CAM -> mask decoding.

Both functions reproduce IRN's ``step/make_cam.py`` and ``step/eval_cam.py`` (../shared/methods/protocol.md §4
and §5, pitfall P3). They are shared by every method and by the CAM writer / evaluator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import NotRequired, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_wsss.cam_files import DEFAULT_BG_THRESHOLD

#: IRN's inference scales (protocol.md §2, §8).
DEFAULT_CAM_SCALES: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)
#: Added to the per-class max before normalising (protocol.md §8, "normalisation eps").
NORM_EPS = 1e-5
#: How a method sizes its full-resolution CAM: ``padded`` = IRN ``make_cam.py`` (bilinear resize to the
#: 16-multiple padded size, then crop to ``H x W``), ``full`` = bilinear resize straight to ``H x W`` (VWE,
#: GSLM ``step/make_cam.py``, SLAMs-R). On a 375 x 500 image the two differ by up to 12 px at the
#: bottom/right edge.
HIGH_RES_RULES = ("padded", "full")


class CAMRecord(TypedDict):
    """The CAMs of one image, in the canonical lit_wsss layout (protocol.md §12)."""

    keys: Tensor  # (K,) int64, 0-based foreground class indices of the present classes
    cam: Tensor  # (K, ceil(H/4), ceil(W/4)) float32 in [0, 1)
    high_res: Tensor  # (K, H, W) float32 in [0, 1)
    bg: NotRequired[Tensor]  # (H, W): only methods with their own background (SIPE), protocol.md §5 table


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """IRN's ``pil_rescale`` size: ``round(H*s), round(W*s)`` with numpy's half-to-even rounding."""
    return int(round(height * scale)), int(round(width * scale))


def scaled_flip_pairs(image: Tensor, scales: Sequence[float] = DEFAULT_CAM_SCALES) -> Iterator[Tensor]:
    """For each scale, the rescaled image batched with its horizontal flip: ``(2, 3, round(H*s), round(W*s))``.

    IRN rescales the uint8 image with PIL bicubic before normalising; here the normalised ``(3, H, W)`` tensor
    is rescaled with antialiased bicubic interpolation (torch's PIL-matching mode). Normalisation is affine
    per channel, so the two differ only by PIL's uint8 rounding and clipping. Scale 1 is the image itself.
    """
    height, width = image.shape[-2:]
    for scale in scales:
        if scale == 1.0:
            scaled = image[None]
        else:
            scaled = F.interpolate(
                image[None], size=scaled_size(height, width, scale), mode="bicubic", align_corners=False,
                antialias=True,
            )
        yield torch.cat([scaled, scaled.flip(-1)], dim=0)


def sum_over_scales(
    fused_maps: Callable[[Tensor], Tensor], image: Tensor, scales: Sequence[float], sizes: Sequence[tuple[int, int]]
) -> list[Tensor]:
    """The multi-scale loop every CAM method shares: per scale, ``fused_maps`` turns the (image, flipped image)
    batch of :func:`scaled_flip_pairs` into one ``(K, h, w)`` map (the method's own flip fusion), which is
    bilinearly resized (``align_corners=False``) to each of ``sizes`` and summed over the scales.

    Returns:
        One ``(K, *size)`` float32 sum per entry of ``sizes``.
    """
    if not scales:
        raise ValueError("at least one inference scale is needed")
    totals: list[Tensor] = []
    for pair in scaled_flip_pairs(image, scales):
        maps = fused_maps(pair).float()[None]
        if maps.shape[1] == 0:  # an image without labels: nothing to resize (interpolate refuses empty input)
            return [maps.new_zeros((0, *size)) for size in sizes]
        resized = [F.interpolate(maps, tuple(size), mode="bilinear", align_corners=False)[0] for size in sizes]
        totals = resized if not totals else [total + r for total, r in zip(totals, resized, strict=True)]
    return totals


def fuse_flip_pair(pair_cams: Tensor, mode: str = "sum") -> Tensor:
    """Merge the CAMs ``(2, C, h, w)`` of an image (row 0) and of its flip (row 1): ``A0 + flip(A1)`` (IRN) or
    ``max(A0, flip(A1))`` (VWE, vwe.md P7)."""
    if pair_cams.dim() != 4 or pair_cams.shape[0] != 2:
        raise ValueError(f"pair_cams must be (2, C, h, w), got {tuple(pair_cams.shape)}")
    if mode not in ("sum", "max"):
        raise ValueError(f"unknown flip fusion {mode!r}; expected 'sum' or 'max'")
    unflipped = pair_cams[1].flip(-1)
    return pair_cams[0] + unflipped if mode == "sum" else torch.maximum(pair_cams[0], unflipped)


@torch.no_grad()
def multiscale_cams(
    cam_fn: Callable[[Tensor], Tensor],
    image: Tensor,
    keys: Tensor,
    scales: Sequence[float] = DEFAULT_CAM_SCALES,
    *,
    flip_fusion: str = "sum",
    high_res: str = "padded",
    normalise: Callable[[Tensor, int], Tensor] | None = None,
) -> CAMRecord:
    """Multi-scale + flip CAMs of one image, by default exactly as IRN ``step/make_cam.py`` (protocol.md §4).

    Args:
        cam_fn: maps a batch ``(N, 3, h, w)`` to non-negative CAMs ``(N, C, h', w')`` (ReLU already applied:
            IRN applies ReLU per pass, BEFORE the flip-sum).
        image: ``(3, H, W)`` or ``(1, 3, H, W)`` ImageNet-normalised image at its original size.
        keys: ``(K,)`` 0-based indices of the classes to export (the image's labels).
        scales: rescale factors; each rescaled image is batched with its horizontal flip.
        flip_fusion: ``sum`` (IRN) or ``max`` (VWE, vwe.md P7) of a pass and its un-flipped flip.
        high_res: ``padded`` (IRN: resized to the 16-multiple padded size, then cropped) or ``full`` (resized
            straight to ``H x W``: VWE, SLAMs-R).
        normalise: ``None`` (each channel divided by its spatial max + 1e-5) or ``normalise(summed, num_maps)``
            applied to both sums, ``num_maps = 2 len(scales)`` (GSLM's WAM mixin: the mean / tau, cls.md §2.2).

    Returns:
        ``keys``, the strided CAM (summed over scales at ``ceil(H/4) x ceil(W/4)``) and the high-resolution CAM,
        normalised as above. Scales are summed, not averaged: the max-normalisation removes the scale.

    Deviation: the rescaling of :func:`scaled_flip_pairs`.
    """
    record = multiscale_cam_sums(cam_fn, image, keys, scales, flip_fusion=flip_fusion, high_res=high_res)
    for name in ("cam", "high_res"):
        summed = record[name]  # type: ignore[literal-required]
        record[name] = (summed / (summed.flatten(1).amax(1).view(-1, 1, 1) + NORM_EPS) if normalise is None  # type: ignore[literal-required]
                        else normalise(summed, 2 * len(scales)))
    return record


@torch.no_grad()
def multiscale_cam_sums(
    cam_fn: Callable[[Tensor], Tensor],
    image: Tensor,
    keys: Tensor,
    scales: Sequence[float] = DEFAULT_CAM_SCALES,
    *,
    flip_fusion: str = "sum",
    high_res: str = "padded",
) -> CAMRecord:
    """:func:`multiscale_cams` before the normalisation: the flip-fused CAMs summed over scales, strided
    (``ceil(H/4) x ceil(W/4)``) and high-resolution (see ``high_res``). For methods that normalise
    differently (GSLM's bounded CAMs, cls.md §2.4)."""
    if flip_fusion not in ("sum", "max"):
        raise ValueError(f"unknown flip fusion {flip_fusion!r}; expected 'sum' or 'max'")
    if high_res not in HIGH_RES_RULES:
        raise ValueError(f"high_res must be one of {list(HIGH_RES_RULES)}, got {high_res!r}")
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"one image at a time, got a batch of {image.shape[0]}")
        image = image[0]
    height, width = image.shape[-2:]
    strided_size = (math.ceil(height / 4), math.ceil(width / 4))
    full_size = (16 * math.ceil(height / 16), 16 * math.ceil(width / 16)) if high_res == "padded" else (height, width)
    keys = keys.to(device=image.device, dtype=torch.long)

    def fuse(pair: Tensor) -> Tensor:
        return fuse_flip_pair(cam_fn(pair)[:, keys].float(), flip_fusion)

    strided, full = sum_over_scales(fuse, image, scales, [strided_size, full_size])
    return CAMRecord(keys=keys, cam=strided, high_res=full[:, :height, :width])


def cams_to_mask(
    high_res: Tensor, keys: Tensor, bg_threshold: float = DEFAULT_BG_THRESHOLD, bg: Tensor | None = None
) -> Tensor:
    """Segmentation mask from foreground CAMs and a background plane (IRN ``eval_cam.py``).

    ``argmax([tau, cam_1..K])`` over channels, mapped through ``(0, keys + 1)``: 0 is background and
    class ``k`` becomes segmentation id ``k + 1`` (protocol.md §5). A method that predicts its own background
    (SIPE's IS-CAM, sipe.md §5.2) passes it as ``bg``: the plain argmax over ``[bg, cam_1..K]``, no threshold.

    Args:
        high_res: ``(K, H, W)`` CAMs in [0, 1].
        keys: ``(K,)`` 0-based foreground class indices.
        bg_threshold: the constant background plane ``tau`` (ignored when ``bg`` is given).
        bg: ``(H, W)`` explicit background map, or ``None`` for the constant plane.

    Returns:
        ``(H, W)`` int64 mask of segmentation ids.
    """
    if len(keys) == 0:
        return torch.zeros(high_res.shape[-2:], dtype=torch.long, device=high_res.device)
    # Same result as argmax over the stacked planes (background first wins ties, then the first class),
    # without materialising the (K+1, H, W) stack: torch's CPU argmax over dim 0 is ~20x slower.
    values, index = high_res.max(dim=0)
    plane = bg_threshold if bg is None else bg.to(values)
    return torch.where(values > plane, keys.to(device=high_res.device, dtype=torch.long)[index] + 1, 0)
