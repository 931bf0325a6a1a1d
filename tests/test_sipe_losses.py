"""SIPE core functions (sipe.md §2, §3, §8; tests §10 items 1-5 at a small size)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lit_wsss.losses.sipe import (
    SIPE_EPS,
    general_cam_with_background,
    gsc_loss,
    hierarchical_features,
    is_cam,
    max_normalise,
    prototypes,
    soft_iou,
    structure_aware_seeds,
    valid_mask,
)

B, C, H, W, HW_IMG = 2, 20, 8, 8, 128
K = C + 1
SIDE_SHAPES = [(8, 32), (8, 16), (16, 8), (16, 8)]  # (channels, size): strides 4/8/16/16 of a 128 crop
F_DIM = sum(c for c, _ in SIDE_SHAPES)


def _labels() -> torch.Tensor:
    y = torch.zeros(B, C, dtype=torch.float64)
    y[0, [2, 6]] = 1.0
    y[1, [0, 19]] = 1.0
    return y


def _in_image() -> torch.Tensor:
    inside = torch.ones(B, HW_IMG, HW_IMG, dtype=torch.bool)
    inside[0, :, 96:] = False  # right padding
    inside[1, 72:, :] = False  # bottom padding
    return inside


def _forward(seed: int = 0, cam_scale: float = 1.0, feature_scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sides = [torch.randn(B, c, s, s, generator=g, dtype=torch.float64) for c, s in SIDE_SHAPES]
    x4 = torch.relu(torch.randn(B, 32, H, W, generator=g, dtype=torch.float64))
    cam = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) * cam_scale
    valid = valid_mask(_in_image(), _labels(), (H, W))
    feats = hierarchical_features(sides) * feature_scale
    mh = general_cam_with_background(cam, valid)
    seeds, q = structure_aware_seeds(mh, valid, x4)
    protos = prototypes(seeds, feats)
    s = is_cam(feats, protos)
    return {
        "sides": sides,
        "x4": x4,
        "cam": cam,
        "valid": valid,
        "F": feats,
        "mh": mh,
        "seeds": seeds,
        "q": q,
        "P": protos,
        "S": s,
    }


# --- §10 item 1: shapes and norms -------------------------------------------------------------------


def test_shapes():
    out = _forward()
    assert out["F"].shape == (B, F_DIM, H, W)
    assert out["valid"].shape == (B, K, H, W)
    for name in ("mh", "q", "seeds", "S"):
        assert out[name].shape == (B, K, H, W), name
    assert out["P"].shape == (B, K, F_DIM)


def test_hierarchical_features_normalise_before_resize():
    out = _forward()
    feats, sides = out["F"], out["sides"]
    start = 0
    for i, (c, _) in enumerate(SIDE_SHAPES):
        block = feats[:, start : start + c]
        s = sides[i]
        n = s / (s.norm(dim=1, keepdim=True) + SIPE_EPS)
        if i >= 2:  # already at the target size: unit per-pixel norm
            assert torch.allclose(block.norm(dim=1), torch.ones(B, H, W, dtype=block.dtype), atol=1e-4)
            assert torch.equal(block, n)
        else:
            expected = F.interpolate(n, size=(H, W), mode="bilinear", align_corners=False)
            assert torch.allclose(block, expected, atol=1e-12)
            # resizing after normalising: the block is no longer unit-norm (sipe.md §8 S5)
            assert (block.norm(dim=1) < 1 - 1e-3).any()
        start += c


def test_valid_mask_matches_full_resolution_construction():
    inside, y = _in_image(), _labels()
    full = torch.zeros(B, K, HW_IMG, HW_IMG, dtype=torch.float64)
    for b in range(B):
        full[b, 0] = inside[b].double()
        for c in range(C):
            full[b, c + 1] = inside[b].double() * y[b, c]
    stride = HW_IMG // H  # legacy nearest: source index = floor(dst * in / out)
    expected = full[:, :, ::stride, ::stride]
    assert torch.equal(valid_mask(inside, y, (H, W)), expected)


def test_general_cam_with_background_independent():
    out = _forward()
    cam, valid, mh = out["cam"], out["valid"], out["mh"]
    for b in range(B):
        m = torch.stack([torch.relu(cam[b, c]) / (torch.relu(cam[b, c]).max() + 1e-5) for c in range(C)])
        bg = 1 - m.max(dim=0).values  # over ALL classes, present or not (§8 S2)
        expected = torch.cat([bg[None], m]) * valid[b]
        assert torch.allclose(mh[b], expected, atol=1e-12)
    # absent-class activations lower the background: differs from the max over present classes only
    present = torch.cat([torch.ones(B, 1, dtype=torch.bool), _labels().bool()], dim=1)
    m_all = max_normalise(torch.relu(cam))
    bg_present = 1 - torch.stack([m_all[b, present[b, 1:]].amax(0) for b in range(B)])
    assert not torch.allclose(mh[:, 0], bg_present * valid[:, 0])


# --- §10 item 2: soft IoU -----------------------------------------------------------------------------


def _soft_iou_loops(mh: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Unhalved soft IoU written with explicit loops (one image)."""
    k_n, h, w = mh.shape
    pix = list(itertools.product(range(h), range(w)))
    f = {}
    for p in pix:
        v = feats[:, p[0], p[1]]
        f[p] = v / (math.sqrt(float((v * v).sum())) + 1e-5)
    cor = {(p, r): max(0.0, float((f[p] * f[r]).sum())) for p in pix for r in pix}
    q = torch.zeros(k_n, h, w, dtype=torch.float64)
    for k in range(k_n):
        mass = sum(float(mh[k, r[0], r[1]]) for r in pix)
        for p in pix:
            inter = sum(cor[(p, r)] * float(mh[k, r[0], r[1]]) for r in pix)
            union = sum(cor[(p, r)] for r in pix) + mass - inter
            q[k, p[0], p[1]] = inter / union
    return q


@pytest.mark.parametrize("size", [2, 3])
def test_soft_iou_and_background_halving_by_loops(size):
    g = torch.Generator().manual_seed(size)
    mh = torch.rand(1, 4, size, size, generator=g, dtype=torch.float64)
    mh[0, 2] = 0.0  # an all-zero channel
    feats = torch.randn(1, 3, size, size, generator=g, dtype=torch.float64)  # some negative cosines
    unhalved = _soft_iou_loops(mh[0], feats[0])
    assert torch.allclose(soft_iou(mh, feats)[0], unhalved, atol=1e-12)
    seeds, q = structure_aware_seeds(mh, torch.ones_like(mh), feats)
    assert torch.allclose(q[0, 0], 0.5 * unhalved[0], atol=1e-12)
    assert torch.allclose(q[0, 1:], unhalved[1:], atol=1e-12)
    assert torch.equal(q[0, 2], torch.zeros(size, size, dtype=torch.float64))
    for i, j in itertools.product(range(size), range(size)):
        scores = [float(q[0, k, i, j]) for k in range(4)]
        best = scores.index(max(scores))
        assert seeds[0, :, i, j].tolist() == [1.0 if k == best else 0.0 for k in range(4)]


def test_soft_iou_range_and_zero_channels():
    out = _forward()
    q, mh = out["q"], out["mh"]
    assert torch.isfinite(q).all()
    assert (q >= 0).all() and (q <= 1).all()
    zero = mh.flatten(2).eq(0).all(-1)  # (B, K): absent classes
    assert zero.sum() == B * C - 4
    assert q.flatten(2)[zero].eq(0).all()


def test_seeds_and_q_carry_no_gradient():
    g = torch.Generator().manual_seed(3)
    cam = torch.randn(B, C, H, W, generator=g, requires_grad=True)
    valid = valid_mask(_in_image(), _labels().float(), (H, W))
    mh = general_cam_with_background(cam, valid)
    seeds, q = structure_aware_seeds(mh, valid, torch.rand(B, 16, H, W, generator=g))
    assert mh.requires_grad
    assert not seeds.requires_grad and not q.requires_grad


# --- §10 item 3: seeds, prototypes, IS-CAM --------------------------------------------------------------


def test_seeds_one_hot_or_zero_none_on_absent_or_padding():
    out = _forward()
    seeds, valid = out["seeds"], out["valid"]
    assert set(seeds.unique().tolist()) <= {0.0, 1.0}
    per_pixel = seeds.sum(1)
    assert (per_pixel <= 1).all()
    padding = valid[:, 0] == 0
    assert padding.any() and per_pixel[padding].eq(0).all()
    present = torch.cat([torch.ones(B, 1, dtype=torch.bool), _labels().bool()], dim=1)
    assert seeds.flatten(2).sum(-1)[~present].eq(0).all()
    assert per_pixel[~padding].sum() > 0


def test_absent_class_gives_zero_prototype_and_zero_is_cam():
    out = _forward()
    protos, s = out["P"], out["S"]
    assert torch.isfinite(s).all() and (s >= 0).all() and (s <= 1 + 1e-12).all()
    has_seed = out["seeds"].flatten(2).sum(-1) > 0
    assert (~has_seed).sum() >= B * C - 4
    for b, k in zip(*torch.nonzero(~has_seed, as_tuple=True)):
        assert torch.equal(protos[b, k], torch.zeros(F_DIM, dtype=protos.dtype))
        assert torch.equal(s[b, k], torch.zeros(H, W, dtype=s.dtype))


def test_prototypes_are_masked_sum_over_hw():
    out = _forward()
    seeds, feats, protos = out["seeds"], out["F"], out["P"]
    for b, k in itertools.product(range(B), range(K)):
        total = torch.zeros(F_DIM, dtype=torch.float64)
        for i, j in itertools.product(range(H), range(W)):
            total += seeds[b, k, i, j] * feats[b, :, i, j]
        assert torch.allclose(protos[b, k], total / (H * W), atol=1e-12)  # sum / hw, not a mean


def test_is_cam_is_relu_cosine():
    out = _forward()
    feats, protos, s = out["F"], out["P"], out["S"]
    for b in range(B):
        for k in range(K):
            cos = F.cosine_similarity(feats[b], protos[b, k][:, None, None], dim=0)
            assert torch.allclose(s[b, k], torch.relu(cos), atol=1e-12)


# --- §10 item 4: invariances ------------------------------------------------------------------------------


def test_positive_cam_scaling_leaves_mh_and_seeds_unchanged():
    ref, scaled = _forward(cam_scale=1.0), _forward(cam_scale=7.3)
    assert torch.allclose(ref["mh"], scaled["mh"], atol=1e-4)
    assert torch.equal(ref["seeds"], scaled["seeds"])


def test_positive_feature_scaling_leaves_is_cam_unchanged():
    ref, scaled = _forward(feature_scale=1.0), _forward(feature_scale=4.5)
    assert torch.equal(ref["seeds"], scaled["seeds"])
    assert torch.allclose(ref["S"], scaled["S"], atol=1e-10)
    assert torch.allclose(ref["P"] * 4.5, scaled["P"], atol=1e-12)


# --- §10 item 5: GSC ------------------------------------------------------------------------------------


def test_gsc_vanishes_when_is_cam_equals_unit_max_mh():
    g = torch.Generator().manual_seed(5)
    mh = torch.rand(B, K, H, W, generator=g)
    mh = mh / mh.amax(dim=(-2, -1), keepdim=True)  # every channel has max exactly 1
    mh[0, 5] = 0.0  # an absent class stays 0 in both
    assert float(gsc_loss(mh, mh.clone())) < 1e-4


def test_gsc_hand_computed_value():
    mh = torch.tensor([[[[0.5, 0.0]], [[0.0, 0.0]]]], dtype=torch.float64)  # (1, 2, 1, 2)
    s = torch.tensor([[[[2.0, 1.0]], [[0.0, 0.0]]]], dtype=torch.float64)
    # Sh = (2, 1) / 2.00001 on channel 0, 0 on channel 1; mean over 4 entries (absent channel included)
    expected = (abs(0.5 - 2 / 2.00001) + abs(0.0 - 1 / 2.00001) + 0.0 + 0.0) / 4
    assert float(gsc_loss(mh, s)) == pytest.approx(expected, rel=1e-12)
    assert float(gsc_loss(mh, s)) == pytest.approx(0.2499981250, rel=1e-8)


def test_gsc_gradients_reach_both_branches():
    g = torch.Generator().manual_seed(6)
    cam = torch.randn(1, C, H, W, generator=g, requires_grad=True)
    feats = torch.randn(1, 12, H, W, generator=g, requires_grad=True)
    mh = general_cam_with_background(cam, torch.ones(1, K, H, W))
    seeds, _ = structure_aware_seeds(mh, torch.ones(1, K, H, W), feats)
    loss = gsc_loss(mh, is_cam(feats, prototypes(seeds, feats)))
    loss.backward()
    assert cam.grad is not None and cam.grad.abs().sum() > 0
    assert feats.grad is not None and feats.grad.abs().sum() > 0
