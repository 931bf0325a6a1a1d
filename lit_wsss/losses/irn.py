"""IRNet losses: inter-pixel affinity (class boundary) and displacement (IRN ``step/train_irn.py``).

Pure functions of tensors, reimplemented from ../shared/methods/protocol.md §6.4 (test §11 item 9). All
sums run over the *whole batch* (not per image), with IRN's ``1e-5`` constants::

    L_pos_bg = sum bg_pos * -log(a + 1e-5)     / (sum bg_pos + 1e-5)
    L_pos_fg = sum fg_pos * -log(a + 1e-5)     / (sum fg_pos + 1e-5)
    L_pos    = (L_pos_bg + L_pos_fg) / 2
    L_neg    = sum neg * -log(1 + 1e-5 - a)    / (sum neg + 1e-5)
    L_dfg    = sum fg_pos * (|dy_hat - dy| + |dx_hat - dx|) / (2 sum fg_pos + 1e-5)
    L_dbg    = sum bg_pos * (|dy_hat| + |dx_hat|)           / (2 sum bg_pos + 1e-5)
    L        = (L_pos + L_neg) / 2 + (L_dfg + L_dbg) / 2

Conventions (the pairs, directions and labels are those of :mod:`lit_wsss.refine.path_index`):

* ``a`` = ``1 - max_path sigmoid(edge_logit)`` (:func:`~lit_wsss.refine.path_index.edge_to_affinity`).
* Displacement map ``D`` (``(B, 2, h, w)``): channel 0 = y (rows, downwards), channel 1 = x (columns,
  rightwards), the same axes as the directions ``(dy, dx)``. For a pair ``(i, j = i + (dy, dx))`` the
  predicted pair displacement is ``delta = D(i) - D(j)`` (source minus destination, IRN
  ``to_pair_displacement``) and the fg-positive target is ``+(dy, dx)``. Read ``D(p)`` as "vector from
  ``p`` to its instance centroid ``c``": ``D(i) - D(j) = (c - i) - (c - j) = j - i = (dy, dx)``. For
  bg-positive pairs the target is 0 (background pixels share one "centroid").
"""

from __future__ import annotations

import torch
from torch import Tensor

from lit_wsss.precision import float32
from lit_wsss.refine.path_index import PathIndex, edge_to_affinity

#: IRN's constant inside the logs and in the denominators.
IRN_EPS = 1e-5


def _masks(labels: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(labels[k].to(dtype) for k in ("bg_pos", "fg_pos", "neg"))  # type: ignore[return-value]


def affinity_losses(affinity: Tensor, labels: dict[str, Tensor]) -> dict[str, Tensor]:
    """IRN's affinity losses.

    Args:
        affinity: ``(B, D, S)`` pair affinities in [0, 1].
        labels: ``{"bg_pos", "fg_pos", "neg"}`` masks ``(B, D, S)`` (bool or float) --
            :func:`~lit_wsss.refine.path_index.affinity_labels` stacked over the batch.

    Returns:
        ``{"pos_bg", "pos_fg", "neg"}`` scalar tensors (batch-wide normalisation).
    """
    bg_pos, fg_pos, neg = _masks(labels, affinity.dtype)
    pos_term = -torch.log(affinity + IRN_EPS)
    neg_term = -torch.log(1.0 + IRN_EPS - affinity)
    return {
        "pos_bg": (bg_pos * pos_term).sum() / (bg_pos.sum() + IRN_EPS),
        "pos_fg": (fg_pos * pos_term).sum() / (fg_pos.sum() + IRN_EPS),
        "neg": (neg * neg_term).sum() / (neg.sum() + IRN_EPS),
    }


def pair_displacement(displacement: Tensor, index: PathIndex) -> Tensor:
    """``delta = D(src) - D(dst)`` for every pair: ``(B, 2, h, w) -> (B, 2, D, S)``."""
    if displacement.dim() != 4 or displacement.shape[1] != 2:
        raise ValueError(f"displacement must be (B, 2, h, w), got {tuple(displacement.shape)}")
    if tuple(displacement.shape[-2:]) != (index.height, index.width):
        raise ValueError(
            f"displacement grid {tuple(displacement.shape[-2:])} does not match the index {index.height}x{index.width}"
        )
    flat = displacement.reshape(displacement.shape[0], 2, -1)
    src = flat.index_select(2, index.src_indices.to(flat.device))  # (B, 2, S)
    dst = flat.index_select(2, index.dst_indices.reshape(-1).to(flat.device))
    dst = dst.view(flat.shape[0], 2, index.num_directions, index.num_sources)
    return src[:, :, None, :] - dst


def displacement_losses(
    displacement: Tensor, labels: dict[str, Tensor], index: PathIndex
) -> dict[str, Tensor]:
    """IRN's displacement losses.

    Args:
        displacement: ``(B, 2, h, w)`` displacement field (channel 0 = y, 1 = x) on the grid of ``index``.
        labels: ``{"bg_pos", "fg_pos", ...}`` masks ``(B, D, S)``.
        index: the :class:`~lit_wsss.refine.path_index.PathIndex` of the grid.

    Returns:
        ``{"dfg", "dbg"}``: L1 to ``(dy, dx)`` over fg-positive pairs and L1 to 0 over bg-positive pairs,
        each divided by ``2 * count + 1e-5`` (two channels).
    """
    bg_pos, fg_pos, _ = _masks(labels, displacement.dtype)
    delta = pair_displacement(displacement, index)  # (B, 2, D, S)
    target = index.displacement_target.to(device=delta.device, dtype=delta.dtype)[None, :, :, None]
    return {
        "dfg": ((delta - target).abs() * fg_pos[:, None]).sum() / (2 * fg_pos.sum() + IRN_EPS),
        "dbg": (delta.abs() * bg_pos[:, None]).sum() / (2 * bg_pos.sum() + IRN_EPS),
    }


@float32
def irn_loss(
    edge_logits: Tensor, displacement: Tensor, labels: dict[str, Tensor], index: PathIndex
) -> dict[str, Tensor]:
    """IRNet's total loss ``(L_pos + L_neg)/2 + (L_dfg + L_dbg)/2`` and its parts.

    Args:
        edge_logits: ``(B, 1, h, w)`` edge-branch logits (the sigmoid is applied here, as in IRN).
        displacement: ``(B, 2, h, w)`` displacement-branch output.
        labels: ``(B, D, S)`` masks ``{"bg_pos", "fg_pos", "neg"}``.
        index: :class:`~lit_wsss.refine.path_index.PathIndex` of radius 10 on the ``(h, w)`` grid.

    Returns:
        ``{"loss", "pos", "pos_bg", "pos_fg", "neg", "dfg", "dbg"}`` (``loss`` is the total).
    """
    affinity = edge_to_affinity(torch.sigmoid(edge_logits), index)
    parts = affinity_losses(affinity, labels)
    parts.update(displacement_losses(displacement, labels, index))
    parts["pos"] = parts["pos_bg"] / 2 + parts["pos_fg"] / 2
    parts["loss"] = (parts["pos"] + parts["neg"]) / 2 + (parts["dfg"] + parts["dbg"]) / 2
    return parts
