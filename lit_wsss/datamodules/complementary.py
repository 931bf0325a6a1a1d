"""CPN's complementary patch pair (../shared/methods/cpn.md §4, pitfalls C1 and C12).

Each training crop ``x`` (CHW, normalised, zero padding = mean colour) is split into ``x1 = x * m`` and
``x2 = x * (1 - m)`` with a binary keep mask ``m`` shared by all channels::

    superpixel (default, ``hide_patch_ss``):
        S     = SLIC(x as HWC, n_segments=300, compactness=10, start_label=1)   on the NORMALISED crop
        Kmax  = max S;  drawn = floor(0.5 (Kmax + 1)) draws from [0, Kmax] WITH replacement
        m     = 0 where S in drawn, 1 elsewhere;           rho = mean(m)       (≈ 61 % kept, not 50 %)
    grid (``hide_patch``):
        s     = uniform choice of {224, 448};  cells of s x s (edge cells may be partial)
        cell hidden iff u <= 0.5, u ~ U[0, 1);              rho = kept cells / cells (NOT a pixel share)

All randomness comes from the ``numpy.random.Generator`` passed in (reproducible per worker/seed).
Masks are numpy ``(H, W)`` bool arrays (True = kept); the pair itself is built on torch tensors.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
from skimage.color import rgb2lab
from skimage.segmentation import slic
from torch import Tensor

#: SLIC parameters of ``hide_patch_ss`` (cpn.md §4, §8).
SLIC_N_SEGMENTS = 300
SLIC_COMPACTNESS = 10.0
#: Share of ``Kmax + 1`` superpixel ids drawn (with replacement) to be hidden (cpn.md §4).
SUPERPIXEL_DRAW_FRACTION = 0.5
#: Grid strategy: cell sizes (chosen uniformly) and per-cell hiding probability (cpn.md §4).
GRID_CELL_SIZES = (224, 448)
GRID_HIDE_PROB = 0.5

Strategy = Literal["superpixel", "grid"]


class ComplementaryPair(NamedTuple):
    """``x1 = x * m``, ``x2 = x * (1 - m)`` (both ``(C, H, W)``) and ``rho`` (kept share of ``x1``)."""

    x1: Tensor
    x2: Tensor
    rho: float


def _to_hwc(image_chw: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image_chw, Tensor):
        image_chw = image_chw.detach().cpu().numpy()
    arr = np.asarray(image_chw)
    if arr.ndim != 3 or arr.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected a float (normalised) image, got {arr.dtype}")
    return np.ascontiguousarray(arr.transpose(1, 2, 0))


def slic_segments(
    image_chw: Tensor | np.ndarray,
    n_segments: int = SLIC_N_SEGMENTS,
    compactness: float = SLIC_COMPACTNESS,
) -> np.ndarray:
    """SLIC superpixels of a NORMALISED crop as the official code (scikit-image 0.17) computed them.

    The official call was ``slic(x_hwc, n_segments=300, compactness=10, start_label=1)`` on the
    normalised float crop, negative values and zero padding included. In 0.17 that meant: float input
    left as is, ``convert2lab=None`` -> ``rgb2lab`` on the raw normalised values (the sRGB / Lab formulas
    are piecewise and pass negative values through their linear branches; assumed unchanged since 0.17),
    then colour scaled by
    ``1 / compactness``. From scikit-image 0.19 on (PR #5518) ``slic`` first rescales the whole image to
    [0, 1] (one min/max over all channels), which would change both the Lab values and the colour/space
    balance. To reproduce 0.17 with 0.26 we therefore call ``rgb2lab`` ourselves on the raw values and
    pass ``convert2lab=False`` with ``compactness / (max(lab) - min(lab))``: 0.26 then computes
    ``(lab - min) / span * span / compactness = (lab - min) / compactness``, i.e. the 0.17 colour features
    up to a constant offset. The offset cancels in every colour distance; the only place it could enter
    is the first k-means assignment, where all centroid colours start at 0, but there a pixel's colour
    term is the same for every candidate centroid, so the assignment is purely spatial either way.

    Verified here: the 0.26 source (rescale, Lab conversion, zero-initialised centroid colours), that
    0.26's ``rgb2lab`` uses the same piecewise formulas without clipping, and (test) that the result is
    identical to running scikit-image's own k-means / connectivity kernels on the unrescaled
    ``rgb2lab(x) / compactness`` features, i.e. the pre-0.19 pipeline. NOT verified: a bit-for-bit
    comparison against an actual scikit-image 0.17 install (its kernels may differ in details such as
    the grid-centroid placement); the input dtype is kept (float32 stays float32).

    Args:
        image_chw: ``(3, H, W)`` normalised float image (torch tensor or numpy array).
        n_segments: approximate number of superpixels.
        compactness: SLIC compactness in the 0.17 (unrescaled Lab) units.

    Returns:
        ``(H, W)`` int labels starting at 1 (``start_label=1``).
    """
    lab = rgb2lab(_to_hwc(image_chw))
    span = float(lab.max() - lab.min())
    return slic(
        lab,
        n_segments=n_segments,
        compactness=compactness / span if span > 0 else compactness,
        convert2lab=False,
        start_label=1,
        channel_axis=-1,
    )


def hide_superpixels(segments: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Keep mask from superpixel labels: ``floor(0.5 (Kmax + 1))`` ids drawn from ``[0, Kmax]`` WITH
    replacement are hidden (cpn.md §4; the official per-pixel loop vectorised with ``np.isin``, C12).

    Id 0 never occurs with ``start_label=1`` (a draw of 0 hides nothing, as in the official code), and
    repeated draws hide one superpixel once, so about ``1 - exp(-0.5) ≈ 39 %`` of the superpixels are
    hidden.

    Args:
        segments: ``(H, W)`` int superpixel labels.
        rng: numpy random generator.

    Returns:
        ``(H, W)`` bool, True = kept (``m = 1``).
    """
    kmax = int(segments.max())
    drawn = rng.integers(0, kmax + 1, size=int(SUPERPIXEL_DRAW_FRACTION * (kmax + 1)))
    return ~np.isin(segments, drawn)


def superpixel_hide_mask(
    image_chw: Tensor | np.ndarray,
    rng: np.random.Generator,
    n_segments: int = SLIC_N_SEGMENTS,
    compactness: float = SLIC_COMPACTNESS,
) -> tuple[np.ndarray, float]:
    """Superpixel keep mask of ``hide_patch_ss`` (cpn.md §4): :func:`slic_segments` + :func:`hide_superpixels`.

    Args:
        image_chw: ``(3, H, W)`` normalised float crop.
        rng: numpy random generator.
        n_segments, compactness: SLIC parameters (see :func:`slic_segments`).

    Returns:
        ``(mask, rho)``: ``(H, W)`` bool, True = kept; ``rho = mean(mask)`` (a pixel fraction).
    """
    mask = hide_superpixels(slic_segments(image_chw, n_segments, compactness), rng)
    return mask, float(mask.mean())


def grid_hide_mask(
    height: int,
    width: int,
    rng: np.random.Generator,
    cell_sizes: tuple[int, ...] = GRID_CELL_SIZES,
    hide_prob: float = GRID_HIDE_PROB,
) -> tuple[np.ndarray, float]:
    """Grid keep mask of ``hide_patch`` (cpn.md §4).

    A cell size ``s`` is drawn uniformly from ``cell_sizes``; the crop is tiled by ``s x s`` cells from
    the top-left corner (the last row/column may be partial); cells are visited row-major and each is
    hidden iff ``u <= hide_prob`` with ``u ~ U[0, 1)``. With a 448 crop: 4 cells or 1 cell (then x1 or
    x2 is all zero).

    Args:
        height, width: crop size.
        rng: numpy random generator.
        cell_sizes: candidate cell sizes.
        hide_prob: per-cell hiding probability.

    Returns:
        ``(mask, rho)``: ``(H, W)`` bool, True = kept; ``rho`` = kept CELLS / cells (not a pixel share).
    """
    if height < 1 or width < 1 or not cell_sizes:
        raise ValueError(f"bad grid request: {height}x{width}, cell sizes {cell_sizes}")
    size = int(cell_sizes[int(rng.integers(len(cell_sizes)))])
    rows, cols = -(-height // size), -(-width // size)
    keep_cells = rng.random((rows, cols)) > hide_prob
    mask = np.repeat(np.repeat(keep_cells, size, axis=0), size, axis=1)[:height, :width]
    return mask, float(keep_cells.mean())


def complementary_pair(
    image: Tensor, rng: np.random.Generator, strategy: Strategy = "superpixel"
) -> ComplementaryPair:
    """Split a normalised crop into its complementary pair (cpn.md §4).

    Hidden pixels become 0 (the mean colour after normalisation). Built with ``torch.where`` so that
    ``x1 + x2 == x`` holds bit-exactly (and hidden entries are +0, not -0).

    Args:
        image: ``(3, H, W)`` normalised float tensor (after the crop).
        rng: numpy random generator.
        strategy: ``"superpixel"`` (default, official) or ``"grid"``.

    Returns:
        :class:`ComplementaryPair` ``(x1, x2, rho)``.
    """
    if image.dim() != 3:
        raise ValueError(f"expected a (C, H, W) tensor, got {tuple(image.shape)}")
    if strategy == "superpixel":
        mask, rho = superpixel_hide_mask(image, rng)
    elif strategy == "grid":
        mask, rho = grid_hide_mask(image.shape[1], image.shape[2], rng)
    else:
        raise ValueError(f"unknown strategy {strategy!r} (expected 'superpixel' or 'grid')")
    x1, x2 = split_by_keep_mask(image, torch.from_numpy(mask).to(image.device)[None])
    return ComplementaryPair(x1, x2, rho)


def split_by_keep_mask(image: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """``x1 = x * m``, ``x2 = x * (1 - m)`` via ``torch.where``: ``x1 + x2 == x`` bit-exactly, hidden = +0.

    Args:
        image: ``(..., C, H, W)``.
        keep: bool mask broadcastable to ``image`` (e.g. ``(1, H, W)`` or ``(B, 1, H, W)``), True = kept.
    """
    zero = torch.zeros((), dtype=image.dtype, device=image.device)
    keep = keep.to(device=image.device, dtype=torch.bool)
    return torch.where(keep, image, zero), torch.where(keep, zero, image)
