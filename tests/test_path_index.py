"""IRN path index and affinity labels (protocol.md §6.3, §11 items 6-7)."""

import math

import pytest
import torch

from lit_wsss.refine.path_index import (
    PathIndex,
    affinity_labels,
    direction_path,
    edge_to_affinity,
    path_directions,
)


def _point_of(flat: torch.Tensor, width: int) -> list[tuple[int, int]]:
    return [(int(i) // width, int(i) % width) for i in flat]


# ---------------------------------------------------------------- directions and paths (§11 item 6)


def test_counts_radius_10_on_128():
    index = PathIndex(10, 128, 128)
    assert index.num_directions == len(path_directions(10)) == 152
    assert index.num_sources == 119 * 110 == 13090
    assert index.source_shape == (119, 110)
    assert index.dst_indices.shape == (152, 13090)
    assert sum(group.shape[0] for group in index.path_indices) == 152
    assert index.displacement_target.shape == (2, 152)


def test_counts_radius_5():
    assert len(path_directions(5)) == 34
    assert PathIndex(5, 20, 20).num_sources == (20 - 4) * (20 - 8)


@pytest.mark.parametrize("radius", [2, 5, 10])
def test_directions_half_plane(radius):
    directions = path_directions(radius)
    expected = {(0, dx) for dx in range(1, radius)} | {
        (dy, dx)
        for dy in range(1, radius)
        for dx in range(-radius + 1, radius)
        if dy * dy + dx * dx < radius * radius
    }
    assert set(directions) == expected and len(directions) == len(expected)
    # each unordered pair once: no direction together with its opposite
    assert not any((-dy, -dx) in expected for dy, dx in expected)
    # IRN order: stably grouped by path length
    lengths = [len(direction_path(*d)) for d in directions]
    assert lengths == sorted(lengths)


def test_direction_order_radius_5_start():
    assert path_directions(5)[:10] == [
        (0, 1),
        (1, 0),
        (0, 2),
        (2, 0),
        (0, 3),
        (1, -1),
        (1, 1),
        (3, 0),
        (0, 4),
        (4, 0),
    ]
    assert path_directions(2) == [(0, 1), (1, 0), (1, -1), (1, 1)]


@pytest.mark.parametrize("radius", [5, 10])
def test_every_path_starts_at_destination_and_contains_origin(radius):
    for dy, dx in path_directions(radius):
        path = direction_path(dy, dx)
        assert path[0] == (dy, dx)
        assert path[-1] == (0, 0)
        assert len(set(path)) == len(path)
        for y, x in path:  # inside the bounding box, perpendicular distance < 1
            assert min(0, dy) <= y <= max(0, dy) and min(0, dx) <= x <= max(0, dx)
            assert abs(dy * x - dx * y) / math.hypot(dy, dx) < 1


def test_paths_by_hand():
    assert direction_path(0, 3) == [(0, 3), (0, 2), (0, 1), (0, 0)]
    assert direction_path(3, 0) == [(3, 0), (2, 0), (1, 0), (0, 0)]
    assert direction_path(1, 1) == [(1, 1), (0, 1), (1, 0), (0, 0)]
    assert direction_path(1, -1) == [(1, -1), (0, -1), (1, 0), (0, 0)]
    # (2, 1): every box point is within 2/sqrt(5) < 1 of the segment
    assert direction_path(2, 1) == [(2, 1), (1, 1), (2, 0), (0, 1), (1, 0), (0, 0)]
    # (3, 1): (0, 1) and (3, 0) are at 3/sqrt(10) < 1, kept
    assert set(direction_path(3, 1)) == {(y, x) for y in range(4) for x in range(2)}
    # (2, 4): (0, 2)..(2, 2) kept; (0, 3) is at |2*3-4*0|/sqrt(20) = 1.34 -> excluded
    path = direction_path(2, 4)
    assert (0, 3) not in path and (2, 1) not in path and (1, 2) in path and (0, 1) in path


def test_sources_destinations_and_path_points():
    index = PathIndex(3, 7, 9)  # r_f = 2: sources rows 0..4, cols 2..6
    width = 9
    src = _point_of(index.src_indices, width)
    assert src == [(y, x) for y in range(5) for x in range(2, 7)]
    group_start = 0
    for group in index.path_indices:
        n, length, s = group.shape
        assert s == index.num_sources
        for i in range(n):
            d = group_start + i
            dy, dx = index.directions[d]
            assert len(index.paths[d]) == length
            dst = _point_of(index.dst_indices[d], width)
            assert dst == [(y + dy, x + dx) for y, x in src]
            for k, (py, px) in enumerate(index.paths[d]):
                assert _point_of(group[i, k], width) == [(y + py, x + px) for y, x in src]
        group_start += n
    assert group_start == index.num_directions
    src_pairs, dst_pairs = index.pairs()
    assert torch.equal(src_pairs.view(index.num_directions, -1)[3], index.src_indices)
    assert torch.equal(dst_pairs.view(index.num_directions, -1), index.dst_indices)
    assert index.displacement_target[:, 0].tolist() == list(index.directions[0])


def test_too_small_grid_raises():
    with pytest.raises(ValueError):
        PathIndex(5, 4, 20)
    with pytest.raises(ValueError):
        PathIndex(5, 20, 8)


# ---------------------------------------------------------------- edge -> affinity


def test_edge_to_affinity_by_hand():
    # radius 2 on 3x4: directions (0,1), (1,0), (1,-1), (1,1); sources (0,1), (0,2), (1,1), (1,2)
    index = PathIndex(2, 3, 4)
    edge = torch.zeros(1, 1, 3, 4)
    edge[0, 0, 1, 2] = 0.7
    expected = torch.tensor(
        [
            [1.0, 1.0, 0.3, 0.3],  # (0,1): the pairs touching (1,2)
            [1.0, 0.3, 1.0, 0.3],  # (1,0)
            [1.0, 0.3, 1.0, 0.3],  # (1,-1): (0,2)->(1,1) passes through (1,2) (fat path)
            [0.3, 0.3, 0.3, 0.3],  # (1,1): every box contains (1,2)
        ]
    )
    affinity = edge_to_affinity(edge, index)
    assert affinity.shape == (1, 4, 4)
    torch.testing.assert_close(affinity[0], expected)
    torch.testing.assert_close(edge_to_affinity(edge[:, 0], index), affinity)


@pytest.mark.parametrize(("radius", "height", "width"), [(5, 9, 13), (10, 12, 21)])
def test_edge_to_affinity_matches_loop(radius, height, width):
    generator = torch.Generator().manual_seed(radius)
    edge = torch.rand(2, 1, height, width, generator=generator)
    index = PathIndex(radius, height, width)
    affinity = edge_to_affinity(edge, index)
    assert affinity.shape == (2, index.num_directions, index.num_sources)
    src = _point_of(index.src_indices, width)
    for d, path in enumerate(index.paths):
        for s in range(0, index.num_sources, 7):
            y, x = src[s]
            expected = 1 - torch.stack([edge[:, 0, y + py, x + px] for py, px in path]).amax(0)
            torch.testing.assert_close(affinity[:, d, s], expected)


def test_edge_to_affinity_gradient_flows():
    index = PathIndex(5, 9, 13)
    edge = torch.rand(1, 1, 9, 13, requires_grad=True)
    edge_to_affinity(edge, index).sum().backward()
    assert edge.grad is not None and edge.grad.abs().sum() > 0


# ---------------------------------------------------------------- affinity labels (§11 item 7)


def test_constant_label_map_has_no_negative_pairs():
    index = PathIndex(10, 32, 40)
    labels = affinity_labels(torch.full((32, 40), 7), index)
    assert not labels["neg"].any() and not labels["bg_pos"].any() and labels["fg_pos"].all()
    labels = affinity_labels(torch.zeros(32, 40, dtype=torch.uint8), index)
    assert not labels["neg"].any() and not labels["fg_pos"].any() and labels["bg_pos"].all()
    assert all(v.dtype == torch.bool and v.shape == (152, index.num_sources) for v in labels.values())


def test_column_of_255_removes_exactly_the_pairs_touching_it():
    height, width, column = 24, 30, 13
    index = PathIndex(10, height, width)
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (height, width), generator=generator)
    label[:, column] = 255
    labels = affinity_labels(label, index)
    valid = labels["bg_pos"] | labels["fg_pos"] | labels["neg"]
    touches = (index.src_indices[None] % width == column) | (index.dst_indices % width == column)
    assert torch.equal(valid, ~touches)
    # the three kinds are disjoint
    total = labels["bg_pos"].int() + labels["fg_pos"].int() + labels["neg"].int()
    assert total.max() == 1


def test_pixels_in_the_middle_of_a_path_do_not_matter():
    index = PathIndex(5, 10, 16)
    label = torch.ones(10, 16, dtype=torch.long)
    label[:, 8] = 255  # a wall of ignored pixels ...
    label[:, 9] = 4  # ... and one of another class
    labels = affinity_labels(label, index)
    d = index.directions.index((0, 3))
    # the source (2, 7): its (0, 3) pair ends at (2, 10) and jumps over columns 8 and 9
    s = int(((index.src_indices // 16 == 2) & (index.src_indices % 16 == 7)).nonzero()[0])
    assert int(index.dst_indices[d, s]) % 16 == 10
    assert labels["fg_pos"][d, s] and not labels["neg"][d, s]


def test_tiny_label_map_hand_counted():
    index = PathIndex(2, 3, 4)  # directions (0,1), (1,0), (1,-1), (1,1); sources (0,1), (0,2), (1,1), (1,2)
    label = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 255], [0, 0, 1, 1]])
    labels = affinity_labels(label, index)
    t, f = True, False
    torch.testing.assert_close(
        labels["bg_pos"], torch.tensor([[f, f, f, f], [f, f, f, f], [t, f, f, f], [f, f, f, f]])
    )
    torch.testing.assert_close(
        labels["fg_pos"], torch.tensor([[f, t, t, f], [f, t, f, t], [f, t, f, f], [f, f, t, t]])
    )
    torch.testing.assert_close(
        labels["neg"], torch.tensor([[t, f, f, f], [t, f, t, f], [f, f, t, t], [t, f, f, f]])
    )
    assert (labels["bg_pos"].sum(), labels["fg_pos"].sum(), labels["neg"].sum()) == (1, 7, 6)


def test_num_classes_bound_is_irn_21_by_default():
    index = PathIndex(2, 3, 4)
    label = torch.full((3, 4), 30)  # a COCO-style class id
    assert not affinity_labels(label, index)["fg_pos"].any()
    assert affinity_labels(label, index, num_classes=81)["fg_pos"].all()


def test_label_shape_mismatch_raises():
    with pytest.raises(ValueError):
        affinity_labels(torch.zeros(4, 4), PathIndex(2, 3, 4))
