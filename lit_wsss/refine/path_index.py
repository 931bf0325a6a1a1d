"""IRN's path index: pixel pairs within a radius, the pixels on the path between them, affinity labels.

Reimplemented from the spec of IRN ``misc/indexing.py`` ``PathIndex`` and ``voc12/dataloader.py``
``GetAffinityLabelFromIndices`` (../shared/methods/protocol.md §6.3, pitfall P7, test §11 item 6-7).

Geometry (all on the stride-4 feature grid, ``radius`` r, ``r_f = r - 1``):

* **Directions** ``(dy, dx)``: the half plane ``dy = 0, 1 <= dx < r`` or ``1 <= dy < r, -r < dx < r`` with
  ``dy^2 + dx^2 < r^2``, so that every unordered pair of pixels closer than ``r`` is listed once
  (152 directions for r = 10, 34 for r = 5). ``dy`` points down (rows), ``dx`` right (columns).
* **Direction order** (IRN's, kept so that direction ``d`` means the same as in the official code):
  directions are generated as ``(0, 1), ..., (0, r-1)`` then row by row ``dy = 1..r-1`` with
  ``dx = -(r-1)..r-1``; this list is then *stably* grouped by the number of points on the path (shortest
  paths first). See :func:`path_directions`.
* **Path** of a direction: the integer points ``(y, x)`` of the bounding box of ``(0, 0)-(dy, dx)`` whose
  perpendicular distance to the segment is ``< 1`` (endpoints included), sorted by decreasing
  ``|y| + |x|`` (stable over row-major order): it starts at the destination ``(dy, dx)`` and ends at
  ``(0, 0)``. See :func:`direction_path`.
* **Sources**: rows ``[0, h - r_f)``, columns ``[r_f, w - r_f)`` (IRN quirk: pairs lying entirely in the
  last ``r_f`` rows or in the first/last ``r_f`` columns are never used), ``S = (h - r_f)(w - 2 r_f)``:
  13090 for r = 10 on 128x128. Sources are flattened row-major; the destination of source ``s`` in
  direction ``d`` is ``src + (dy, dx)``, always inside the grid.

Flat pixel indices are ``y * width + x`` on the ``(height, width)`` grid of the index.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: IRN's valid-label bound: a pair is valid iff both labels are ``< 21`` (VOC: 0..20, 255 = ignore).
VOC_NUM_CLASSES = 21


def path_directions(radius: int) -> list[tuple[int, int]]:
    """The half-plane directions ``(dy, dx)`` closer than ``radius``, in IRN's order.

    Order: generation order ``(0, 1)..(0, r-1)``, then ``dy = 1..r-1`` each with ``dx = -(r-1)..r-1``
    (only ``dy^2 + dx^2 < r^2``), stably sorted by ``len(direction_path(dy, dx))`` (ascending) -- exactly
    the order of IRN's ``search_dst``. ``radius=10`` gives 152 directions, ``radius=5`` gives 34.
    """
    radius = _check_radius(radius)
    generated = [(0, dx) for dx in range(1, radius)]
    generated += [
        (dy, dx)
        for dy in range(1, radius)
        for dx in range(-radius + 1, radius)
        if dy * dy + dx * dx < radius * radius
    ]
    return sorted(generated, key=lambda d: len(direction_path(*d)))  # sorted() is stable


def direction_path(dy: int, dx: int) -> list[tuple[int, int]]:
    """Integer points ``(y, x)`` between ``(0, 0)`` and ``(dy, dx)`` (both included).

    A point of the bounding box of the two endpoints belongs to the path iff its perpendicular distance to
    the segment is ``< 1``, i.e. ``(dy*x - dx*y)^2 < dy^2 + dx^2`` (exact integer test). Points are sorted
    by decreasing ``|y| + |x|`` with ties in row-major order, so the list starts at the destination
    ``(dy, dx)`` and ends at ``(0, 0)``. Examples: ``(0, 3) -> [(0,3), (0,2), (0,1), (0,0)]``,
    ``(1, 1) -> [(1,1), (0,1), (1,0), (0,0)]``.
    """
    dy, dx = int(dy), int(dx)
    length_sq = dy * dy + dx * dx
    if length_sq == 0:
        raise ValueError("direction (0, 0) has no path")
    points = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 < length_sq
    ]
    return sorted(points, key=lambda p: -abs(p[0]) - abs(p[1]))  # stable: row-major among ties


def _check_radius(radius: int) -> int:
    if int(radius) != radius or radius < 2:
        raise ValueError(f"radius must be an integer >= 2, got {radius!r}")
    return int(radius)


class PathIndex:
    """Flat gather indices of IRN's pairs and paths on a ``(height, width)`` grid.

    Attributes:
        radius, radius_floor: ``r`` and ``r_f = r - 1``.
        height, width: the grid.
        directions: list of ``D`` directions ``(dy, dx)`` in IRN's order (:func:`path_directions`).
        paths: ``paths[d]`` = :func:`direction_path` of ``directions[d]`` (destination first).
        source_shape: ``(h - r_f, w - 2 r_f)``, the rectangle of sources (rows ``[0, h - r_f)``,
            columns ``[r_f, w - r_f)``).
        src_indices: ``(S,)`` int64 flat indices of the sources (row-major over ``source_shape``).
        dst_indices: ``(D, S)`` int64 flat indices of ``source + directions[d]``.
        path_indices: list of int64 tensors ``(n_g, L_g, S)``, one per group of consecutive directions
            with the same path length ``L_g`` (the groups cover ``0..D-1`` in order);
            ``path_indices[g][i, k, s]`` = flat index of ``source_s + paths[d][k]`` for the ``i``-th
            direction ``d`` of the group. ``k = 0`` is the destination, ``k = L_g - 1`` the source.
        displacement_target: ``(2, D)`` float32, row 0 = ``dy``, row 1 = ``dx`` (IRN ``disp_target``).

    Memory: ``sum_d len(paths[d]) * S`` int64 values (2134 * 13090 * 8 B ~ 0.22 GB for radius 10 on 128x128,
    as in IRN, which keeps the same indices as GPU buffers; 242 * S for radius 5).
    """

    def __init__(self, radius: int, height: int, width: int) -> None:
        self.radius = _check_radius(radius)
        self.radius_floor = self.radius - 1
        self.height, self.width = int(height), int(width)
        rf = self.radius_floor
        crop_h, crop_w = self.height - rf, self.width - 2 * rf
        if crop_h < 1 or crop_w < 1:
            raise ValueError(
                f"grid {self.height}x{self.width} too small for radius {self.radius}: needs height >= {rf + 1} "
                f"and width >= {2 * rf + 1}"
            )
        self.source_shape = (crop_h, crop_w)
        self.directions = path_directions(self.radius)
        self.paths = [direction_path(dy, dx) for dy, dx in self.directions]

        full = torch.arange(self.height * self.width, dtype=torch.long).view(self.height, self.width)
        self.src_indices = full[:crop_h, rf : rf + crop_w].reshape(-1).clone()

        def flat_offset(y: int, x: int) -> int:  # every path point of a source lies inside the grid
            return y * self.width + x

        self.dst_indices = torch.stack([self.src_indices + flat_offset(dy, dx) for dy, dx in self.directions])

        self.path_indices: list[Tensor] = []
        start = 0
        while start < len(self.paths):
            length = len(self.paths[start])
            stop = start
            while stop < len(self.paths) and len(self.paths[stop]) == length:
                stop += 1
            offsets = torch.tensor(
                [[flat_offset(y, x) for y, x in self.paths[d]] for d in range(start, stop)], dtype=torch.long
            )  # (n_g, L_g)
            self.path_indices.append(offsets[:, :, None] + self.src_indices[None, None, :])
            start = stop

        self.displacement_target = torch.tensor(self.directions, dtype=torch.float32).t().contiguous()

    @property
    def num_directions(self) -> int:
        return len(self.directions)

    @property
    def num_sources(self) -> int:
        return int(self.src_indices.numel())

    def to(self, device: torch.device | str) -> PathIndex:
        """Moves the index tensors to ``device`` (in place) and returns ``self``."""
        self.src_indices = self.src_indices.to(device)
        self.dst_indices = self.dst_indices.to(device)
        self.path_indices = [p.to(device) for p in self.path_indices]
        self.displacement_target = self.displacement_target.to(device)
        return self

    def pairs(self) -> tuple[Tensor, Tensor]:
        """``(src, dst)``, both ``(D * S,)`` int64, in the order of ``affinity.reshape(B, D * S)``.

        Each unordered pair of the index appears once (direction-major, then sources row-major); it is
        the sparse layout used to build IRN's symmetric affinity matrix.
        """
        src = self.src_indices.expand(self.num_directions, -1).reshape(-1)
        return src, self.dst_indices.reshape(-1)


def edge_to_affinity(edge: Tensor, index: PathIndex) -> Tensor:
    """``a_ij = 1 - max_{k on path(i, j)} edge_k`` for every pair of ``index``.

    Args:
        edge: ``(B, 1, h, w)`` or ``(B, h, w)`` edge *probabilities* (``sigmoid(edge_logit)`` in training,
            the boundary map ``B`` at inference), on the grid of ``index``.
        index: the :class:`PathIndex` of that grid; call ``index.to(edge.device)`` once, otherwise its
            indices are copied to the edge's device on every call.

    Returns:
        ``(B, D, S)`` affinities. The max is ``Tensor.max(dim)`` (gradient to one maximal point, like IRN's
        ``max_pool2d``); the gather is vectorised over sources and directions (one gather per path-length
        group).
    """
    if edge.dim() == 4:
        if edge.shape[1] != 1:
            raise ValueError(f"edge must have one channel, got shape {tuple(edge.shape)}")
        edge = edge[:, 0]
    if edge.dim() != 3 or tuple(edge.shape[-2:]) != (index.height, index.width):
        raise ValueError(
            f"edge shape {tuple(edge.shape)} does not match the index grid {index.height}x{index.width}"
        )
    flat = edge.reshape(edge.shape[0], -1)
    out = []
    for group in index.path_indices:
        n, length, s = group.shape
        gathered = flat.index_select(1, group.reshape(-1).to(flat.device)).view(flat.shape[0], n, length, s)
        out.append(1 - gathered.max(dim=2).values)
    return torch.cat(out, dim=1)


def affinity_labels(label: Tensor, index: PathIndex, num_classes: int = VOC_NUM_CLASSES) -> dict[str, Tensor]:
    """IRN's pair labels from a segmentation label map (``GetAffinityLabelFromIndices``).

    The caller passes the IR label already nearest-downsampled by 0.25 after the joint crop (protocol.md
    §6.3, P7); crop padding must be 255. Mind the sampling phase: IRN resizes with PIL ``NEAREST``
    (``imutils.pil_rescale(label, 0.25, 0)``), which samples pixel centres, i.e. ``label[2::4, 2::4]`` for a
    512 crop (checked with Pillow 13), whereas ``F.interpolate(mode="nearest")`` gives ``label[::4, ::4]``.

    A pair ``(src, dst)`` is *valid* iff both labels are in ``[0, num_classes)`` -- IRN uses ``< 21``, which
    for VOC IR labels (values 0..20 and 255) is the same as "neither is 255"; pass ``num_classes=81`` for
    COCO. *Positive* iff valid and equal; ``bg_pos`` if positive and 0, ``fg_pos`` if positive and > 0;
    ``neg`` iff valid and different. Pixels in the middle of a path do not matter.

    Args:
        label: ``(h, w)`` integer labels on the grid of ``index``.
        index: the :class:`PathIndex`.
        num_classes: labels ``>= num_classes`` (and negative ones) are ignored.

    Returns:
        ``{"bg_pos", "fg_pos", "neg"}``, each a ``(D, S)`` bool tensor. Stack them along a new first
        dimension for a batch.
    """
    if tuple(label.shape) != (index.height, index.width):
        raise ValueError(
            f"label shape {tuple(label.shape)} does not match the index grid {index.height}x{index.width}"
        )
    flat = torch.as_tensor(label).reshape(-1).long()
    src = flat[index.src_indices.to(flat.device)][None, :]  # (1, S)
    dst = flat[index.dst_indices.to(flat.device)]  # (D, S)
    valid = (src >= 0) & (src < num_classes) & (dst >= 0) & (dst < num_classes)
    equal = src == dst
    positive = equal & valid
    return {
        "bg_pos": positive & (src == 0),
        "fg_pos": positive & (src > 0),
        "neg": valid & ~equal,
    }
