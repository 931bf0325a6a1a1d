"""CPN complementary pair (cpn.md §4, pitfalls C1/C12; tests §12 item 1)."""

import math

import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from lit_wsss.datamodules.complementary import (
    complementary_pair,
    grid_hide_mask,
    hide_superpixels,
    slic_segments,
    superpixel_hide_mask,
)


def _normalised_crop(seed: int = 0, size: int = 64) -> torch.Tensor:
    """A smooth, ImageNet-normalised-looking image with blobs of colour and a zero-padding strip."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    img = np.zeros((3, size, size))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.1, 0.3)]
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        img += rng.uniform(-2, 2, size=(3, 1, 1)) * blob
    img += 0.05 * rng.normal(size=img.shape)
    img[:, :, -size // 5 :] = 0.0  # padding = mean colour
    return torch.from_numpy(img.astype(np.float32))


# --- superpixel strategy ----------------------------------------------------------------------------


def test_superpixel_pair_is_exact_and_whole_superpixels():
    x = _normalised_crop(0)
    assert x.min() < 0  # negative values go through SLIC
    x1, x2, rho = complementary_pair(x, np.random.default_rng(7), strategy="superpixel")
    assert torch.equal(x1 + x2, x)  # bit-exact
    mask, rho_ref = superpixel_hide_mask(x, np.random.default_rng(7))  # same draws
    keep = torch.from_numpy(mask)
    assert torch.equal(x1, torch.where(keep, x, torch.zeros(()))) and torch.all(x2[:, keep] == 0)
    assert rho == rho_ref == pytest.approx(float(mask.mean()))
    assert 0 < rho < 1
    segments = slic_segments(x)
    for label in np.unique(segments):
        inside = mask[segments == label]
        assert inside.all() or not inside.any(), f"superpixel {label} is split"
    assert len(np.unique(segments[~mask])) >= 1


def test_slic_segments_labels_and_legacy_scale_dependence():
    x = _normalised_crop(1)
    s = slic_segments(x)
    assert s.shape == (64, 64) and s.min() == 1
    assert set(np.unique(s)) == set(range(1, s.max() + 1))
    assert 20 < s.max() < 600
    # scikit-image 0.17 did not rescale float images: SLIC on the normalised crop depends on its
    # absolute scale (0.26's default slic would rescale to [0, 1] and ignore it)
    assert not np.array_equal(s, slic_segments(x * 2.0))
    # numpy input and torch input agree
    assert np.array_equal(s, slic_segments(x.numpy()))


def _unrescaled_slic(hwc: np.ndarray, n_segments: int = 300, compactness: float = 10.0) -> np.ndarray:
    """The pre-0.19 pipeline (no [0, 1] rescale: Lab of the raw values times 1 / compactness) run with
    scikit-image's own private k-means and connectivity kernels."""
    slic_mod = pytest.importorskip("skimage.segmentation.slic_superpixels")
    kernels = pytest.importorskip("skimage.segmentation._slic")
    if not hasattr(slic_mod, "_get_grid_centroids") or not hasattr(kernels, "_slic_cython"):
        pytest.skip("scikit-image internals changed")
    image = rgb2lab(hwc)[np.newaxis]
    centroids, steps = slic_mod._get_grid_centroids(image, n_segments)
    segments = np.ascontiguousarray(
        np.concatenate([centroids, np.zeros((len(centroids), 3))], axis=-1), dtype=image.dtype
    )
    image = np.ascontiguousarray(image / compactness, dtype=image.dtype)
    spacing = np.ones(3, dtype=image.dtype)
    labels = kernels._slic_cython(image, None, segments, max(steps), 10, spacing, False, start_label=1)
    size = math.prod(image.shape[:3]) / len(centroids)
    return kernels._enforce_label_connectivity_cython(labels, int(0.5 * size), int(3 * size), start_label=1)[
        0
    ]


@pytest.mark.parametrize("seed", [0, 3])
def test_slic_segments_equal_unrescaled_pipeline(seed: int):
    x = _normalised_crop(seed)
    expected = _unrescaled_slic(np.ascontiguousarray(x.numpy().transpose(1, 2, 0)))
    assert np.array_equal(slic_segments(x), expected)


def test_hide_superpixels_draws_with_replacement():
    kmax = 20000
    segments = np.arange(1, kmax + 1).reshape(100, 200)  # one pixel per superpixel
    mask = hide_superpixels(segments, np.random.default_rng(3))
    draws = (kmax + 1) // 2
    expected_hidden = 1 - (1 - 1 / (kmax + 1)) ** draws  # ≈ 1 - exp(-0.5) ≈ 0.393
    assert expected_hidden == pytest.approx(1 - math.exp(-0.5), abs=1e-3)
    assert (1 - mask.mean()) == pytest.approx(expected_hidden, abs=0.015)  # without replacement: 0.5


@pytest.mark.parametrize(("kmax", "draws"), [(3, 2), (4, 2), (5, 3)])
def test_hide_superpixels_number_of_draws(kmax: int, draws: int):
    segments = np.arange(1, kmax + 1).reshape(1, kmax)
    hidden = [int((~hide_superpixels(segments, np.random.default_rng(seed))).sum()) for seed in range(300)]
    assert max(hidden) == draws  # floor(0.5 (Kmax + 1)) draws, id 0 included in the range
    assert min(hidden) == 0  # all draws may hit id 0 or repeat


# --- grid strategy ----------------------------------------------------------------------------------


def test_grid_224_on_448_rho_values_and_cells():
    rhos = set()
    for seed in range(200):
        mask, rho = grid_hide_mask(448, 448, np.random.default_rng(seed), cell_sizes=(224,))
        cells = mask.reshape(2, 224, 2, 224)
        corner = cells[:, 0, :, 0]
        assert np.array_equal(cells, np.broadcast_to(corner[:, None, :, None], cells.shape))
        assert rho == float(corner.mean()) == float(mask.mean())
        rhos.add(rho)
    assert rhos == {0.0, 0.25, 0.5, 0.75, 1.0}


def test_grid_default_sizes_and_cell_fraction():
    # on 672 x 672: 448 cells -> 2 x 2 (rho in quarters), 224 cells -> 3 x 3 (rho in ninths)
    quarters, ninths = {0.25, 0.5, 0.75}, {k / 9 for k in range(1, 9)}
    seen = set()
    for seed in range(40):
        _, rho = grid_hide_mask(672, 672, np.random.default_rng(seed))
        assert rho in quarters | ninths | {0.0, 1.0}
        seen.add(448 if rho in quarters else 224 if rho in ninths else None)
    assert {224, 448} <= seen
    # partial edge cells: rho counts CELLS, not pixels
    differs = False
    for seed in range(40):
        mask, rho = grid_hide_mask(300, 300, np.random.default_rng(seed), cell_sizes=(224,))
        corners = mask[[0, 0, 224, 224], [0, 224, 0, 224]]
        assert rho == float(corners.mean())
        differs |= rho != float(mask.mean())
    assert differs


def test_grid_hide_probability():
    hidden = [
        1 - grid_hide_mask(448, 448, np.random.default_rng(s), cell_sizes=(224,))[1] for s in range(400)
    ]
    assert np.mean(hidden) == pytest.approx(0.5, abs=0.05)
    assert grid_hide_mask(448, 448, np.random.default_rng(0), hide_prob=1.0)[1] == 0.0
    assert grid_hide_mask(448, 448, np.random.default_rng(0), hide_prob=-1.0)[1] == 1.0


def test_grid_pair_exact():
    x = torch.from_numpy(np.random.default_rng(5).normal(size=(3, 448, 448)).astype(np.float32))
    for seed in range(5):
        x1, x2, rho = complementary_pair(x, np.random.default_rng(seed), strategy="grid")
        assert torch.equal(x1 + x2, x)
        mask, rho_ref = grid_hide_mask(448, 448, np.random.default_rng(seed))
        assert rho == rho_ref
        assert torch.equal(x1 != 0, torch.from_numpy(mask)[None].expand_as(x))


def test_bad_inputs():
    x = _normalised_crop(2, size=32)
    with pytest.raises(ValueError, match="strategy"):
        complementary_pair(x, np.random.default_rng(0), strategy="checkerboard")
    with pytest.raises(ValueError):
        complementary_pair(x[0], np.random.default_rng(0))
    with pytest.raises(ValueError):
        slic_segments(x[:2])
