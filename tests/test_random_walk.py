"""IRN random walk (protocol.md §6.5, P5-P6, §11 item 8): transition matrix, sparse == dense, decoding."""

import pytest
import torch

from lit_wsss.refine.path_index import direction_path, path_directions
from lit_wsss.refine.random_walk import (
    labels_from_scores,
    random_walk,
    transition_matrix,
    walk_scores,
    walk_to_labels,
)


def _reference_transition(boundary: torch.Tensor, radius: int, beta: float) -> torch.Tensor:
    """Dense T built pair by pair straight from the spec (no padding, no PathIndex)."""
    h, w = boundary.shape
    affinity = torch.eye(h * w, dtype=torch.float64)
    b = boundary.double()
    for dy, dx in path_directions(radius):
        path = direction_path(dy, dx)
        for y in range(h):
            for x in range(w):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    a = 1 - max(float(b[y + py, x + px]) for py, px in path)
                    i, j = y * w + x, (y + dy) * w + x + dx
                    affinity[i, j] = affinity[j, i] = a
    weight = affinity**beta
    return weight / weight.sum(dim=0, keepdim=True)


def _ring(height: int, width: int, top: int, left: int, bottom: int, right: int) -> torch.Tensor:
    """Boundary map with a closed 2-pixel-thick square ring of 1 (rows top..bottom, cols left..right)."""
    b = torch.zeros(height, width)
    b[top : bottom + 1, left : right + 1] = 1
    b[top + 2 : bottom - 1, left + 2 : right - 1] = 0
    return b


# ---------------------------------------------------------------- transition matrix


def test_transition_matrix_by_hand_1x3():
    boundary = torch.tensor([[0.2, 0.0, 0.6]], dtype=torch.float64)
    affinity = torch.tensor([[1.0, 0.8, 0.4], [0.8, 1.0, 0.4], [0.4, 0.4, 1.0]], dtype=torch.float64)
    for beta in (1.0, 2.0):
        trans = transition_matrix(boundary, beta=beta, dtype=torch.float64)
        assert trans.is_sparse and trans.shape == (3, 3)
        weight = affinity**beta
        torch.testing.assert_close(trans.to_dense(), weight / weight.sum(0, keepdim=True))


def test_transition_matrix_by_hand_2x2_fat_diagonal_paths():
    # B = 0.5 at (1, 1): the diagonal pair (0,1)-(1,0) also crosses it (its path is the whole 2x2 box)
    boundary = torch.tensor([[0.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    affinity = torch.tensor(
        [[1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 0.5, 0.5], [1.0, 0.5, 1.0, 0.5], [0.5, 0.5, 0.5, 1.0]],
        dtype=torch.float64,
    )
    trans = transition_matrix(boundary, beta=1.0, dtype=torch.float64).to_dense()
    torch.testing.assert_close(trans, affinity / affinity.sum(0, keepdim=True))


@pytest.mark.parametrize(("height", "width", "beta"), [(6, 7, 10.0), (9, 5, 2.0)])
def test_transition_matrix_matches_pairwise_reference(height, width, beta):
    boundary = torch.rand(height, width, generator=torch.Generator().manual_seed(height))
    trans = transition_matrix(boundary, beta=beta, dtype=torch.float64).to_dense()
    torch.testing.assert_close(trans, _reference_transition(boundary, 5, beta))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transition_columns_sum_to_one(dtype):
    boundary = torch.rand(20, 17, generator=torch.Generator().manual_seed(0))
    trans = transition_matrix(boundary, dtype=dtype)
    assert trans.dtype == dtype
    column_sums = torch.sparse.sum(trans, dim=0).to_dense()
    torch.testing.assert_close(column_sums, torch.ones(20 * 17, dtype=dtype))
    # at most 1 + 2 * 34 non-zeros per column; interior columns have exactly 69
    per_column = torch.bincount(trans.indices()[1], minlength=20 * 17).view(20, 17)
    assert per_column.max() == 69 and per_column[4:-4, 4:-4].eq(69).all()


# ---------------------------------------------------------------- random walk invariants


@pytest.mark.parametrize("method", ["sparse", "dense"])
@pytest.mark.parametrize("beta", [3.0, 10.0])
def test_constant_cam_stays_constant_without_boundary(method, beta):
    cams = torch.full((2, 11, 13), 0.6)
    cams[1] = 0.2
    walked = random_walk(cams, torch.zeros(11, 13), beta=beta, method=method)
    torch.testing.assert_close(walked, cams, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["sparse", "dense"])
def test_closed_ring_does_not_leak(method):
    boundary = _ring(20, 22, 4, 5, 15, 16)
    inside = torch.zeros(20, 22, dtype=torch.bool)
    inside[6:14, 7:15] = True
    generator = torch.Generator().manual_seed(1)
    cams = torch.rand(2, 20, 22, generator=generator) * inside
    walked = random_walk(cams, boundary, method=method)
    assert walked[:, ~inside].eq(0).all()  # exactly 0 outside and on the ring
    assert (walked[:, inside] > 0).all()
    # activation outside only, the inside stays exactly empty
    walked = random_walk(torch.rand(1, 20, 22, generator=generator) * ~inside, boundary, method=method)
    assert walked[:, inside].eq(0).all()


def test_boundary_pixels_are_emptied_before_the_walk():
    boundary = torch.zeros(12, 12)
    boundary[5, 5] = 1.0  # an isolated wall pixel: only connected to itself
    cams = torch.zeros(1, 12, 12)
    cams[0, 5, 5] = 1.0
    assert random_walk(cams, boundary).eq(0).all()


def test_one_step_is_a_weighted_average_with_t_on_the_right():
    boundary = torch.rand(8, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cams = torch.rand(3, 8, 9, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    trans = transition_matrix(boundary, dtype=torch.float64).to_dense()
    expected = ((cams * (1 - boundary)).reshape(3, -1) @ trans).reshape(3, 8, 9)
    for method in ("sparse", "dense"):
        walked = random_walk(cams, boundary, exp_times=0, method=method, dtype=torch.float64)
        torch.testing.assert_close(walked, expected)
    two_steps = ((cams * (1 - boundary)).reshape(3, -1) @ trans @ trans).reshape(3, 8, 9)
    torch.testing.assert_close(random_walk(cams, boundary, exp_times=1, dtype=torch.float64), two_steps)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("height", "width"), [(12, 15), (20, 20)])
def test_sparse_equals_dense(seed, height, width):
    generator = torch.Generator().manual_seed(seed)
    boundary = torch.rand(height, width, generator=generator) ** 2
    cams = torch.rand(3, height, width, generator=generator)
    keys = torch.tensor([2, 7, 14])
    image_size = (4 * height - 3, 4 * width - 1)

    sparse64 = random_walk(cams, boundary, method="sparse", dtype=torch.float64)
    dense64 = random_walk(cams, boundary, method="dense", dtype=torch.float64)
    torch.testing.assert_close(sparse64, dense64, rtol=1e-9, atol=1e-12)
    assert torch.equal(
        walk_to_labels(sparse64, keys, *image_size), walk_to_labels(dense64, keys, *image_size)
    )

    sparse32 = random_walk(cams, boundary, method="sparse")
    dense32 = random_walk(cams, boundary, method="dense")
    assert sparse32.dtype == dense32.dtype == torch.float32
    scale = float(dense64.abs().max())
    torch.testing.assert_close(sparse32.double(), dense64, rtol=0, atol=5e-4 * scale)
    torch.testing.assert_close(dense32.double(), dense64, rtol=0, atol=5e-4 * scale)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        random_walk(torch.rand(1, 5, 6), torch.rand(5, 7))
    with pytest.raises(ValueError):
        random_walk(torch.rand(1, 5, 6), torch.rand(5, 6), method="power")
    assert random_walk(torch.zeros(0, 5, 6), torch.rand(5, 6)).shape == (0, 5, 6)


# ---------------------------------------------------------------- decoding


def test_walk_to_labels_by_hand():
    # h x w = 1 x 2 covers a 3 x 7 image; bilinear x4 along x of [a, b] gives
    # a, a, .875a+.125b, .625a+.375b, .375a+.625b, .125a+.875b, b, (b)
    walked = torch.tensor([[[4.0, 0.0]], [[0.0, 2.0]]])
    keys = torch.tensor([0, 2])
    scores = walk_scores(walked, 3, 7)
    expected_a = torch.tensor([1.0, 1.0, 0.875, 0.625, 0.375, 0.125, 0.0])  # divided by the global max 4
    expected_b = torch.tensor([0.0, 0.0, 0.0625, 0.1875, 0.3125, 0.4375, 0.5])
    torch.testing.assert_close(scores, torch.stack([expected_a, expected_b])[:, None, :].expand(2, 3, 7))
    labels = walk_to_labels(walked, keys, 3, 7)
    assert labels.dtype == torch.int64 and labels.shape == (3, 7)
    assert labels[0].tolist() == [1, 1, 1, 1, 1, 3, 3]
    assert labels_from_scores(scores, keys, 0.45)[0].tolist() == [1, 1, 1, 1, 0, 0, 3]
    assert labels_from_scores(scores, keys, 0.5)[0].tolist() == [1, 1, 1, 1, 0, 0, 0]  # ties -> background


def test_normalisation_is_global_not_per_class():
    walked = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 0.2)])
    scores = walk_scores(walked, 8, 8)
    torch.testing.assert_close(scores[1], torch.full((8, 8), 0.2))  # not rescaled to 1
    assert walk_to_labels(walked, torch.tensor([4, 5]), 8, 8).eq(5).all()


def test_degenerate_walks_decode_to_background():
    assert walk_to_labels(torch.zeros(2, 3, 3), torch.tensor([0, 1]), 10, 12).eq(0).all()
    empty = walk_to_labels(torch.zeros(0, 3, 3), torch.zeros(0, dtype=torch.long), 10, 12)
    assert empty.shape == (10, 12) and empty.eq(0).all()
    with pytest.raises(ValueError):
        walk_scores(torch.zeros(1, 2, 2), 9, 8)
