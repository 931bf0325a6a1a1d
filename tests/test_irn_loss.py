"""IRNet losses (protocol.md §6.4, §11 item 9)."""

import math

import pytest
import torch

from lit_wsss.losses.irn import affinity_losses, displacement_losses, irn_loss, pair_displacement
from lit_wsss.refine.path_index import PathIndex, affinity_labels

EPS = 1e-5


def _batch(*label_maps: torch.Tensor, index: PathIndex) -> dict[str, torch.Tensor]:
    per_image = [affinity_labels(m, index) for m in label_maps]
    return {k: torch.stack([p[k] for p in per_image]) for k in per_image[0]}


def _two_region_label(height: int, width: int) -> torch.Tensor:
    label = torch.zeros(height, width, dtype=torch.long)
    label[4:14, 6:18] = 3
    label[:, -2:] = 255
    return label


def test_zero_edges_give_zero_positive_and_maximal_negative_loss():
    index = PathIndex(10, 20, 24)
    labels = _batch(_two_region_label(20, 24), index=index)
    assert labels["bg_pos"].any() and labels["fg_pos"].any() and labels["neg"].any()
    edge_logits = torch.full((1, 1, 20, 24), -math.inf, dtype=torch.float64)  # sigmoid == 0 exactly
    parts = irn_loss(edge_logits, torch.zeros(1, 2, 20, 24, dtype=torch.float64), labels, index)
    assert abs(float(parts["pos"])) < 2e-5  # -log(1 + 1e-5)
    n_neg = float(labels["neg"].sum())
    assert float(parts["neg"]) == pytest.approx(-math.log(EPS) * n_neg / (n_neg + EPS), rel=1e-12)
    assert float(parts["neg"]) == pytest.approx(-math.log(1e-5), rel=1e-6)


def test_perfect_displacement_gives_zero_displacement_loss():
    height, width = 20, 24
    index = PathIndex(10, height, width)
    label = _two_region_label(height, width)
    labels = _batch(label, index=index)
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centroid = (8.0, 11.0)
    toward_centroid = torch.stack([centroid[0] - ys, centroid[1] - xs]).float()  # D(p) = c - p
    fg = (label > 0) & (label < 255)
    displacement = torch.where(fg, toward_centroid, torch.zeros(()))[None]
    parts = displacement_losses(displacement, labels, index)
    assert float(parts["dfg"]) == 0.0 and float(parts["dbg"]) == 0.0
    # the opposite sign convention (D(p) = p - c) is penalised: sign check of delta = D(src) - D(dst)
    assert float(displacement_losses(-displacement, labels, index)["dfg"]) > 1.0


def test_pair_displacement_is_source_minus_destination():
    index = PathIndex(2, 3, 4)
    displacement = torch.arange(24, dtype=torch.float64).view(1, 2, 3, 4)
    delta = pair_displacement(displacement, index)
    assert delta.shape == (1, 2, 4, 4)
    flat = displacement.view(2, -1)
    for d in range(4):
        for s in range(4):
            i, j = int(index.src_indices[s]), int(index.dst_indices[d, s])
            torch.testing.assert_close(delta[0, :, d, s], flat[:, i] - flat[:, j])


def test_tiny_case_by_hand():
    # radius 2 on 3x4, see tests/test_path_index.py: 1 bg-positive, 7 fg-positive, 6 negative pairs.
    index = PathIndex(2, 3, 4)
    label = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 255], [0, 0, 1, 1]])
    labels = _batch(label, index=index)
    edge_logits = torch.full((1, 1, 3, 4), -math.inf, dtype=torch.float64)
    edge_logits[0, 0, 1, 2] = math.log(0.7 / 0.3)  # sigmoid = 0.7 -> affinity 0.3 on paths through (1, 2)
    displacement = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    displacement[0, :, 1, 1] = torch.tensor([1.0, 2.0])
    parts = irn_loss(edge_logits, displacement, labels, index)

    # affinities: bg pair a = 1; fg pairs: one a = 1, six a = 0.3; neg pairs: four a = 1, two a = 0.3
    pos_bg = -math.log(1 + EPS) / (1 + EPS)
    pos_fg = (-math.log(1 + EPS) - 6 * math.log(0.3 + EPS)) / (7 + EPS)
    neg = (-4 * math.log(EPS) - 2 * math.log(1 + EPS - 0.3)) / (6 + EPS)
    # |delta - (dy, dx)| over the 7 fg pairs: 1 + 2 + 1 + 1 + 3 + 1 + 2 = 11; the bg pair has delta 0
    dfg = 11 / (2 * 7 + EPS)
    dbg = 0.0
    expected = {
        "pos_bg": pos_bg,
        "pos_fg": pos_fg,
        "pos": (pos_bg + pos_fg) / 2,
        "neg": neg,
        "dfg": dfg,
        "dbg": dbg,
        "loss": ((pos_bg + pos_fg) / 2 + neg) / 2 + (dfg + dbg) / 2,
    }
    for key, value in expected.items():
        assert float(parts[key]) == pytest.approx(value, rel=1e-10, abs=1e-12), key


def test_sums_run_over_the_whole_batch():
    index = PathIndex(2, 3, 4)
    label_a = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 255], [0, 0, 1, 1]])
    label_b = torch.zeros(3, 4, dtype=torch.long)  # 16 bg-positive pairs, nothing else
    labels = _batch(label_a, label_b, index=index)
    affinity = torch.full((2, 4, 4), 0.5, dtype=torch.float64)
    affinity[1] = 0.9
    parts = affinity_losses(affinity, labels)
    # pooled: 1 bg pair at 0.5 (image a) + 16 at 0.9 (image b), not the mean of per-image losses
    pooled = (-math.log(0.5 + EPS) - 16 * math.log(0.9 + EPS)) / (17 + EPS)
    assert float(parts["pos_bg"]) == pytest.approx(pooled, rel=1e-12)


def test_loss_is_differentiable():
    index = PathIndex(10, 20, 24)
    labels = _batch(_two_region_label(20, 24), _two_region_label(20, 24).flip(-1), index=index)
    edge_logits = torch.randn(2, 1, 20, 24, requires_grad=True)
    displacement = torch.randn(2, 2, 20, 24, requires_grad=True)
    parts = irn_loss(edge_logits, displacement, labels, index)
    parts["loss"].backward()
    assert torch.isfinite(parts["loss"])
    assert edge_logits.grad.abs().sum() > 0 and displacement.grad.abs().sum() > 0
