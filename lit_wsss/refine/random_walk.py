"""IRN's random walk of CAMs on the boundary-derived transition matrix, and its decoding into labels.

Reimplemented from the spec of IRN ``misc/indexing.py`` (``propagate_to_edge``, ``to_transition_matrix``)
and ``step/make_sem_seg_labels.py`` (../shared/methods/protocol.md §6.5, pitfalls P5-P6, test §11 item 8).

On the stride-4 grid ``(h, w)`` (``N = h*w`` pixels, flat index ``y*w + x``) with boundary map ``B``::

    A_ij = 1 - max_{k on path(i, j)} B_k   for the pairs of the radius-5 half plane (34 directions),
           symmetrised (A_ji = A_ij), A_ii = 1, 0 for every other pair
    T    = A^{∘beta} D^{-1},  D = diag(column sums)     -> column-stochastic: sum_i T_ij = 1
    M    = cams ⊙ (1 - B)                               (K, h, w), boundary pixels emptied
    R    = vec(M) · T^(2^exp_times)                     (K, N) row vectors times T on the right

``R_j = sum_i M_i T_ij`` is a weighted *average* over the neighbours of ``j`` (column ``j`` sums to 1),
so constant maps are fixed points. ``exp_times`` is the log2 of the walk length (8 -> 256 steps, P6).

Two implementations of the same walk:

* ``method="dense"`` -- IRN's: the dense ``N x N`` matrix squared ``exp_times`` times, then one product
  (``O(N^3 exp_times)`` time, ``O(N^2)`` memory: 0.55 GB per float32 copy for a 500x375 image).
* ``method="sparse"`` -- ``2^exp_times`` products of the sparse matrix with the ``(N, K)`` CAM matrix,
  computed as ``R^t <- T^t R^t`` with ``T^t = D^{-1} A^{∘beta}`` (row-stochastic) in CSR
  (``O(69 N K 2^exp_times)`` time, ``O(69 N)`` memory).

Precision: float32 by default (as IRN). Measured against a float64 reference on random 12x15..40x30
maps: dense float32 within ~4e-5 of the max value, sparse float32 within ~1.5e-4 (256 sequential
roundings instead of 8); so the two float32 methods agree to ~1e-4 relative, and a pixel whose top two
scores (or top score and the 0.25 background) are that close can flip. ``dtype=torch.float64`` makes
them agree to ~1e-13 (labels identical in practice); the sparse walk costs about the same in float64
(it is bound by reading the CSR indices), the dense one about twice as much.

CPU performance notes (``benchmarks/random_walk_speed.py``): the sparse walk is 256 short sparse products;
with several intra-op threads on cores shared with other work each product can wait for a descheduled
thread (measured 10x slower with 2 threads than with 1 on a busy 2-core machine): for bulk pseudo-label
generation prefer one process per core with ``torch.set_num_threads(1)``. The dense squaring produces
float32 denormals (far-away weights < 1.2e-38), which x86 multiplies 10-50x slower; IRN ran it on a GPU.
``torch.set_flush_denormal(True)`` avoids that, but only on the calling thread (so with 1 thread); this
module does not touch that global setting.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lit_wsss.cams import cams_to_mask
from lit_wsss.precision import float32
from lit_wsss.refine.path_index import PathIndex, edge_to_affinity

#: IRN defaults (protocol.md §8): inference radius, beta, exp_times (2^8 = 256 steps), bg threshold.
DEFAULT_RADIUS = 5
DEFAULT_BETA = 10.0
DEFAULT_EXP_TIMES = 8
DEFAULT_SEM_SEG_BG_THRESHOLD = 0.25
#: Stride of the CAM / boundary grid relative to the image.
STRIDE = 4


def _affinity_pairs(boundary: Tensor, radius: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(i, j, a_ij)`` for the half-plane pairs with both endpoints inside the ``(h, w)`` grid.

    As IRN: ``B`` is padded by ``radius`` on the left, right and bottom with 1 (outside = wall), a
    :class:`PathIndex` is built on the padded grid, and only pairs with both endpoints inside the
    original grid are kept (a path lies in the bounding box of its endpoints, so the padding value never
    reaches a kept pair; it only makes the index fit).
    """
    h, w = boundary.shape
    padded = F.pad(boundary[None, None], (radius, radius, 0, radius), mode="constant", value=1.0)[0]
    hp, wp = h + radius, w + 2 * radius
    index = PathIndex(radius, hp, wp).to(boundary.device)
    affinity = edge_to_affinity(padded, index)[0].reshape(-1)  # (D*S,)
    src, dst = index.pairs()

    def to_inner(flat: Tensor) -> tuple[Tensor, Tensor]:
        y, x = flat // wp, flat % wp - radius
        return (y < h) & (x >= 0) & (x < w), y * w + x

    src_in, src_flat = to_inner(src)
    dst_in, dst_flat = to_inner(dst)
    keep = src_in & dst_in
    return src_flat[keep], dst_flat[keep], affinity[keep]


def transition_matrix(
    boundary: Tensor,
    radius: int = DEFAULT_RADIUS,
    beta: float = DEFAULT_BETA,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """IRN's column-stochastic transition matrix ``T = A^{∘beta} D^{-1}`` as a sparse COO tensor.

    Args:
        boundary: ``(h, w)`` boundary probabilities ``B`` in [0, 1] on the stride-4 grid.
        radius: path radius (IRN inference: 5, i.e. 34 directions, up to 69 non-zeros per column).
        beta: affinity exponent.
        dtype: computation and output dtype.

    Returns:
        Coalesced sparse COO ``(N, N)``, ``N = h*w``; ``T[i, j]`` is the weight of pixel ``i`` in the
        average that produces pixel ``j`` (columns sum to 1).
    """
    if boundary.dim() != 2:
        raise ValueError(f"boundary must be (h, w), got {tuple(boundary.shape)}")
    boundary = boundary.to(dtype)
    h, w = boundary.shape
    n = h * w
    src, dst, affinity = _affinity_pairs(boundary, radius)
    weight = affinity.pow(beta)
    diag = torch.arange(n, device=boundary.device)
    rows = torch.cat([src, dst, diag])
    cols = torch.cat([dst, src, diag])
    values = torch.cat([weight, weight, torch.ones(n, dtype=dtype, device=boundary.device)])
    column_sums = torch.zeros(n, dtype=dtype, device=boundary.device).index_add_(0, cols, values)
    values = values / column_sums[cols]
    indices = torch.stack([rows, cols])
    return torch.sparse_coo_tensor(indices, values, (n, n), check_invariants=False).coalesce()


@float32
def random_walk(
    cams: Tensor,
    boundary: Tensor,
    beta: float = DEFAULT_BETA,
    exp_times: int = DEFAULT_EXP_TIMES,
    radius: int = DEFAULT_RADIUS,
    method: Literal["sparse", "dense"] = "sparse",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """IRN's random walk ``R = vec(cams ⊙ (1 - B)) · T^(2^exp_times)`` (protocol.md §6.5).

    Args:
        cams: ``(K, h, w)`` *strided* CAMs (the ``cam`` entry, not ``high_res``; P5).
        boundary: ``(h, w)`` boundary map ``B``.
        beta, exp_times, radius: IRN's parameters (10, 8 -> 256 steps, 5).
        method: ``"sparse"`` (default; ``2^exp_times`` sparse products, memory linear in ``N``) or
            ``"dense"`` (IRN's repeated squaring of the dense ``N x N`` matrix; only for small maps).
        dtype: computation dtype (float32 as IRN), also under ``bf16-mixed``: autocast is off here
            (:mod:`lit_wsss.precision`).

    Returns:
        ``(K, h, w)`` walked maps (not normalised), on the device of ``boundary``.
    """
    if cams.dim() != 3 or tuple(cams.shape[-2:]) != tuple(boundary.shape):
        raise ValueError(
            f"cams {tuple(cams.shape)} must be (K, h, w) with (h, w) = boundary {tuple(boundary.shape)}"
        )
    if exp_times < 0:
        raise ValueError(f"exp_times must be >= 0, got {exp_times}")
    k, h, w = cams.shape
    boundary = boundary.to(dtype)
    x = (cams.to(device=boundary.device, dtype=dtype) * (1 - boundary)).reshape(k, h * w)
    if k == 0:
        return x.reshape(k, h, w)
    trans = transition_matrix(boundary, radius=radius, beta=beta, dtype=dtype)
    if method == "dense":
        dense = trans.to_dense()
        for _ in range(exp_times):
            dense = dense @ dense
        return (x @ dense).reshape(k, h, w)
    if method == "sparse":
        # x @ T == (T^t @ x^t)^t; T^t is row-stochastic, kept in CSR for a fast sparse x dense product.
        with warnings.catch_warnings():  # torch: "Sparse CSR tensor support is in beta state"
            warnings.filterwarnings(
                "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
            )
            trans_t = trans.t().coalesce().to_sparse_csr()
        walked = x.t().contiguous()  # (N, K)
        for _ in range(2**exp_times):
            walked = torch.sparse.mm(trans_t, walked)
        return walked.t().reshape(k, h, w)
    raise ValueError(f"method must be 'sparse' or 'dense', got {method!r}")


def walk_scores(walked: Tensor, height: int, width: int) -> Tensor:
    """Walked maps -> image-size scores normalised by the global max (IRN ``make_sem_seg_labels.py``).

    Bilinear x4 upsampling (``align_corners=False``), crop to ``(height, width)``, then division by the max
    over ALL classes and pixels (not per class; P5). Deviation from IRN for a degenerate input: when that
    max is ``<= 0`` (e.g. the walk emptied every map) the scores are returned as zeros (IRN divides by 0
    and gets NaN). ``K = 0`` gives an empty ``(0, height, width)`` tensor.

    Args:
        walked: ``(K, h, w)`` output of :func:`random_walk`, ``h = ceil(height/4)``, ``w = ceil(width/4)``.
        height, width: the image size.

    Returns:
        ``(K, height, width)`` scores in [0, 1]; sweep the background threshold on them with
        :func:`labels_from_scores` without walking again.
    """
    k, h, w = walked.shape
    if STRIDE * h < height or STRIDE * w < width:
        raise ValueError(f"walked grid {h}x{w} x{STRIDE} does not cover the image {height}x{width}")
    if k == 0:
        return walked.new_zeros((0, height, width))
    up = F.interpolate(walked[None], scale_factor=STRIDE, mode="bilinear", align_corners=False)[0]
    up = up[:, :height, :width]
    peak = up.max()
    return up / peak if peak > 0 else torch.zeros_like(up)


def labels_from_scores(
    scores: Tensor, keys: Tensor, bg_threshold: float = DEFAULT_SEM_SEG_BG_THRESHOLD
) -> Tensor:
    """``keys'[argmax([bg_threshold, R_1..K])]`` with ``keys' = (0, keys + 1)``; ties go to background.

    Args:
        scores: ``(K, H, W)`` from :func:`walk_scores`.
        keys: ``(K,)`` 0-based foreground class indices.
        bg_threshold: IRN's ``sem_seg_bg_thres`` (0.25).

    Returns:
        ``(H, W)`` int64 segmentation ids (0 = background, class ``k`` -> ``k + 1``).
    """
    return cams_to_mask(scores, torch.as_tensor(keys), bg_threshold)


def walk_to_labels(
    walked: Tensor,
    keys: Tensor,
    height: int,
    width: int,
    bg_threshold: float = DEFAULT_SEM_SEG_BG_THRESHOLD,
) -> Tensor:
    """Pseudo label of one image: :func:`walk_scores` then :func:`labels_from_scores`.

    Returns:
        ``(height, width)`` int64 segmentation ids.
    """
    return labels_from_scores(walk_scores(walked, height, width), keys, bg_threshold)
