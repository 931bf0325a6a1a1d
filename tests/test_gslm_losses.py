"""GSLM (CLS) core functions (cls.md §2, §3, §8; tests §10 items 1-7 at a small size).

Item 8 (smoke run of the GLM and one SLM round) and the weight/optimiser part of item 6 need the module and
the round driver and are not here.
"""

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lit_wsss.losses.gslm as gslm
from lit_wsss.cams import multiscale_cams
from lit_wsss.gslm_rounds import CONF_BG_THRESHOLD, CONF_FG_THRESHOLD, GSLM_CRF_PARAMS, NUM_ROUNDS, round_thresholds
from lit_wsss.refine.ir_labels import CRF_PARAMS, crf_inference_label, ir_label
from lit_wsss.losses.gslm import (
    GSLM_EPS,
    TAU,
    bounded_cam,
    classification_loss,
    downsample_seeds,
    gap_logits,
    max_normalise,
    seg_loss,
    seg_loss_terms,
    slm_cam,
    slm_losses,
    wam_normalise,
)

B, C, H, W = 2, 3, 4, 4
DT = torch.float64


def _wam_module(weight: torch.Tensor):  # noqa: ANN202
    """A GSLM (wam head, tiny random backbone) whose pooling head holds ``weight`` (C, C, k, k)."""
    from lit_wsss.modules import GSLM

    model = GSLM(num_classes=weight.shape[0], backbone="resnet18", pretrained=None, pool_size=weight.shape[-1])
    model = model.to(weight.dtype)
    with torch.no_grad():
        model.pool.weight.copy_(weight)
    return model


def _wam_logits(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """GSLM.slm_logits of the wam head with the pooling weight ``weight``."""
    return _wam_module(weight).slm_logits(a)


def _wam_cams(cam_fn, image, keys):  # noqa: ANN001, ANN202 - GSLM.infer_cams of the wam head on a stub map
    return multiscale_cams(cam_fn, image, keys, high_res="full",
                           normalise=lambda summed, maps: wam_normalise(summed, maps, TAU))


def _labels() -> torch.Tensor:
    y = torch.zeros(B, C, dtype=DT)
    y[0, [0, 2]] = 1.0
    y[1, 1] = 1.0
    return y


def _seeds() -> torch.Tensor:
    """(B, H, W): every value kind present (bg, present classes, an absent class, ignore)."""
    return torch.tensor(
        [
            [[1, 1, 0, 255], [1, 3, 0, 255], [0, 0, 3, 3], [255, 0, 2, 3]],
            [[0, 2, 2, 255], [0, 2, 2, 0], [255, 255, 0, 0], [0, 0, 0, 1]],
        ],
        dtype=torch.long,
    )


def _cam_logits(seed: int = 0, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, H, W, generator=g, dtype=DT) * scale + 2.0).requires_grad_(True)


def _smooth_l1(d: torch.Tensor) -> torch.Tensor:
    """SmoothL1 with beta = 1 of one scalar difference."""
    return 0.5 * d * d if abs(d.detach().item()) < 1.0 else d.abs() - 0.5


def _reference_seg_loss(cam: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """L_seg of cls.md §2.4 with explicit Python loops (one scalar at a time)."""
    total = cam.new_zeros(())
    for b in range(cam.shape[0]):
        valid = [(i, j) for i in range(cam.shape[2]) for j in range(cam.shape[3]) if seeds[b, i, j] != 255]
        if not valid:
            continue
        for c in range(cam.shape[1]):
            if labels[b, c] != 1:
                continue
            peak = cam[b, c].max()
            s = cam.new_zeros(())
            for i, j in valid:
                pred = 6.0 * cam[b, c, i, j] / (peak + 1e-5)
                target = 6.0 if int(seeds[b, i, j]) == c + 1 else 0.0
                s = s + _smooth_l1(pred - target)
            total = total + s / len(valid)
    return total


def _bounded_ref(a: torch.Tensor) -> torch.Tensor:
    return torch.clamp(a, 0.0, 6.0)


# ----------------------------------------------------------------------------------------------------
# §10 item 1: L_seg
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_seg_loss_matches_explicit_loops_value_and_gradient(seed: int) -> None:
    a = _cam_logits(seed)
    labels, seeds = _labels(), _seeds()
    ours = seg_loss(bounded_cam(a), labels, seeds)
    ref = _reference_seg_loss(_bounded_ref(a), labels, seeds)
    assert ours.item() > 0.1
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, a)
    (g_ref,) = torch.autograd.grad(_reference_seg_loss(_bounded_ref(a), labels, seeds), a)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)


def test_seg_loss_is_zero_at_the_target_and_ignores_ignored_pixels() -> None:
    labels, seeds = _labels(), _seeds()
    present = labels.bool()[:, :, None, None]
    target = 6.0 * (seeds[:, None] == torch.arange(1, C + 1).view(1, C, 1, 1)).to(DT) * present
    g = torch.Generator().manual_seed(3)
    wild = torch.randn(B, C, H, W, generator=g, dtype=DT) * 50.0  # far outside [0, 6] too
    ignored = (seeds == 255)[:, None].expand(B, C, H, W)
    a = torch.where(ignored, wild, target)
    loss = seg_loss(bounded_cam(a), labels, seeds)
    # pred = 6 * 6 / (6 + 1e-5) on seeds: |d| ~ 1e-5, 0.5 d^2 ~ 5e-11 per pixel
    assert 0.0 <= loss.item() < 1e-9
    # any change of the ignored pixels leaves L_seg unchanged (the cap keeps every max at 6)
    for s in range(3):
        other = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(10 + s), dtype=DT) * 50.0
        changed = seg_loss(bounded_cam(torch.where(ignored, other, target)), labels, seeds)
        assert changed.item() == loss.item()
    # ...whereas moving one VALID pixel off the target is penalised (the test can fail)
    off = a.clone()
    off[0, 0, 0, 2] = 4.0  # a bg pixel of present class 0
    assert seg_loss(bounded_cam(off), labels, seeds).item() > 0.1


def test_ignored_pixel_can_set_the_normaliser_p4() -> None:
    """P4: the max runs over ALL pixels, ignored ones included, so an ignored peak changes L_seg."""
    labels, seeds = _labels(), _seeds()
    a = torch.full((B, C, H, W), 1.0, dtype=DT)
    base = seg_loss(bounded_cam(a), labels, seeds)
    a[0, 0, 0, 3] = 4.0  # ignored pixel of image 0 becomes the peak of present class 0
    moved = seg_loss(bounded_cam(a), labels, seeds)
    assert not math.isclose(base.item(), moved.item(), rel_tol=1e-6)
    torch.testing.assert_close(moved, _reference_seg_loss(_bounded_ref(a), labels, seeds))


def test_seg_loss_is_a_sum_over_images_and_classes_not_a_mean() -> None:
    a = _cam_logits(4).detach()
    cam, labels, seeds = bounded_cam(a), _labels(), _seeds()
    total = seg_loss(cam, labels, seeds)
    parts = []
    for b in range(B):
        for c in range(C):
            if labels[b, c] == 1:
                one = torch.zeros(1, C, dtype=DT)
                one[0, c] = 1.0
                parts.append(seg_loss(cam[b : b + 1], one, seeds[b : b + 1]))
    assert len(parts) == 3
    torch.testing.assert_close(total, sum(parts))
    # duplicating the batch doubles it (P3: grows with the batch size)
    doubled = seg_loss(torch.cat([cam, cam]), torch.cat([labels, labels]), torch.cat([seeds, seeds]))
    torch.testing.assert_close(doubled, 2 * total)
    # the corrected reduction is the mean over the counted (image, class) pairs
    torch.testing.assert_close(seg_loss(cam, labels, seeds, reduction="mean"), total / 3)
    terms, counted = seg_loss_terms(cam, labels, seeds)
    assert counted.tolist() == [[True, False, True], [False, True, False]]
    assert (terms[~counted] == 0).all()


def test_all_ignore_image_contributes_a_zero_tensor_p13() -> None:
    a = _cam_logits(5)
    labels, seeds = _labels(), _seeds()
    seeds[1] = 255
    both = seg_loss(bounded_cam(a), labels, seeds)
    alone = seg_loss(bounded_cam(a[:1]), labels[:1], seeds[:1])
    torch.testing.assert_close(both, alone)
    seeds[0] = 255
    nothing = slm_losses(gap_logits(a), a, labels, seeds)["seg"]
    assert isinstance(nothing, torch.Tensor) and nothing.dim() == 0 and nothing.item() == 0.0
    assert torch.isfinite(nothing) and nothing.requires_grad
    (g,) = torch.autograd.grad(nothing, a)
    assert (g == 0).all()


# ----------------------------------------------------------------------------------------------------
# §10 item 2: the seed-reactivation bound, and P4's non-detached normaliser
# ----------------------------------------------------------------------------------------------------


def _bound_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    labels = torch.tensor([[1.0, 0.0, 0.0]], dtype=DT)
    seeds = torch.zeros(1, H, W, dtype=torch.long)
    seeds[0, 0, :] = 1  # a row of seeds of class 0
    seeds[0, 3, 3] = 255
    a = torch.full((1, C, H, W), 0.5, dtype=DT)
    a[0, 0, 0, 0] = 9.0  # seed above the bound: saturated peak
    a[0, 0, 0, 1] = 3.0  # weak seed: must be pushed up
    a[0, 0, 0, 2] = 7.0  # seed above the bound
    a[0, 0, 1, 0] = -2.0  # background pixel below 0
    a[0, 0, 2, 2] = 12.0  # background pixel above the bound
    return a.requires_grad_(True), labels, seeds


def test_bounded_cam_gradient_is_zero_outside_the_bound() -> None:
    a, labels, seeds = _bound_case()
    seg = slm_losses(gap_logits(a), a, labels, seeds)["seg"]
    (g,) = torch.autograd.grad(seg, a)
    outside = (a.detach() > 6) | (a.detach() < 0)
    assert outside.sum() == 4
    assert (g[outside] == 0).all()
    assert g[0, 0, 0, 1] < 0  # descent raises the weak seed towards the bound
    # seg weight 0.5 x dSmoothL1/dd (-1, d ~ -3) x dpred/dA (6 / (6 + 1e-5)) / 15 valid pixels
    torch.testing.assert_close(g[0, 0, 0, 1], torch.tensor(-0.5 * 6.0 / (6.0 + 1e-5) / 15, dtype=DT))
    # absent classes get no gradient from L_seg at all
    assert (g[0, 1:] == 0).all()


def test_cam_head_is_not_bounded_p1() -> None:
    """head='cam' (the released script) regresses relu(A): pixels above 6 keep their gradient."""
    a, labels, seeds = _bound_case()
    seg = slm_losses(gap_logits(a), a, labels, seeds, head="cam")["seg"]
    (g,) = torch.autograd.grad(seg, a)
    assert g[0, 0, 0, 2] != 0  # A = 7, a seed below the peak 12
    assert g[0, 0, 2, 2] != 0  # A = 12, the peak: through the normaliser and its own (bg) term
    assert g[0, 0, 1, 0] == 0  # ReLU still kills negatives
    ref = 0.5 * _reference_seg_loss(F.relu(a), labels, seeds)
    torch.testing.assert_close(seg, ref)


def test_normaliser_is_not_detached_p4() -> None:
    labels = torch.tensor([[1.0, 0.0, 0.0]], dtype=DT)
    seeds = torch.zeros(1, H, W, dtype=torch.long)
    seeds[0, 0, 0] = 1
    seeds[0, 3, :] = 255
    a = torch.full((1, C, H, W), 1.0, dtype=DT)
    a[0, 0, 3, 1] = 4.0  # the peak sits on an IGNORED pixel, inside the bound
    a.requires_grad_(True)
    (g,) = torch.autograd.grad(seg_loss(bounded_cam(a), labels, seeds), a)
    assert g[0, 0, 3, 1] != 0  # gradient reaches the ignored peak through the max
    assert g[0, 0, 3, 0] == 0  # an ignored non-peak pixel gets none
    # the same loss with a detached normaliser (what P4 says the code does NOT do) gives 0 there
    cam = bounded_cam(a)
    detached = cam / (cam.detach().amax(dim=(-2, -1), keepdim=True) + GSLM_EPS)
    valid = seeds[0] != 255
    target = 6.0 * (seeds[0][valid] == 1).to(DT)
    (g_det,) = torch.autograd.grad(F.smooth_l1_loss(6.0 * detached[0, 0][valid], target), a)
    assert g_det[0, 0, 3, 1] == 0
    # ...and the max's gradient goes only to the peak: every other pixel gets the same gradient
    others = torch.ones_like(g, dtype=torch.bool)
    others[0, 0, 3, 1] = False
    torch.testing.assert_close(g_det[others], g[others])


def test_pool_head_is_trained_by_cls_only_and_mlsm_matches_its_formula() -> None:
    a = _cam_logits(6)
    labels, seeds = _labels(), _seeds()
    model = _wam_module(torch.randn(C, C, 4, 4, generator=torch.Generator().manual_seed(7), dtype=DT))
    weight = model.pool.weight
    out = slm_losses(model.slm_logits(a), a, labels, seeds)
    assert set(out) == set(gslm.LOSS_KEYS)
    (g_seg,) = torch.autograd.grad(out["seg"], weight, retain_graph=True, allow_unused=True)
    assert g_seg is None
    (g_cls,) = torch.autograd.grad(out["cls"], weight)
    assert g_cls.abs().sum() > 0
    # MLSM by its formula, on WAM logits from an explicit loop (a 4x4 pool of a 4x4 map is the identity)
    logits = torch.zeros(B, C, dtype=DT)
    for b in range(B):
        for c in range(C):
            for c2 in range(C):
                for i in range(4):
                    for j in range(4):
                        logits[b, c] += weight[c, c2, i, j].item() * a[b, c2, i, j].item()
    x = logits
    mlsm = -(labels * F.logsigmoid(x) + (1 - labels) * F.logsigmoid(-x)).mean()
    torch.testing.assert_close(out["cls"].detach(), mlsm)
    torch.testing.assert_close(
        out["seg"].detach(), 0.5 * _reference_seg_loss(_bounded_ref(a.detach()), labels, seeds)
    )


# ----------------------------------------------------------------------------------------------------
# §10 item 3: WAM head
# ----------------------------------------------------------------------------------------------------


def test_wam_logits_match_an_explicit_loop() -> None:
    g = torch.Generator().manual_seed(8)
    a = torch.randn(B, C, 8, 8, generator=g, dtype=DT)
    weight = torch.randn(C, C, 4, 4, generator=g, dtype=DT)
    expected = torch.zeros(B, C, dtype=DT)
    for b in range(B):
        for c in range(C):
            for c2 in range(C):
                for i in range(4):
                    for j in range(4):
                        block = a[b, c2, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean()
                        expected[b, c] += weight[c, c2, i, j] * block
    torch.testing.assert_close(_wam_logits(a, weight), expected)


def test_wam_head_reproduces_gap_at_32() -> None:
    g = torch.Generator().manual_seed(9)
    weight = torch.zeros(C, C, 32, 32, dtype=DT)
    for c in range(C):
        weight[c, c] = 1.0 / 1024
    for size in (32, 64):  # multiples of 32: disjoint bins, exact
        a = torch.randn(B, C, size, size, generator=g, dtype=DT)
        out = _wam_logits(a, weight)
        assert out.shape == (B, C)
        torch.testing.assert_close(out, a.mean(dim=(2, 3)), rtol=1e-12, atol=1e-12)
    for size in (20, 40):  # other sizes: still (B, C); exact only for constant maps
        a = torch.randn(B, C, size, size, generator=g, dtype=DT)
        out = _wam_logits(a, weight)
        assert out.shape == (B, C)
        assert not torch.allclose(out, a.mean(dim=(2, 3)), rtol=1e-9, atol=1e-9)
        const = torch.full((B, C, size, size), 2.5, dtype=DT)
        torch.testing.assert_close(_wam_logits(const, weight), torch.full((B, C), 2.5, dtype=DT))


def test_slm_cam_head_errors() -> None:
    with pytest.raises(ValueError, match="unknown SLM head"):
        slm_cam(torch.zeros(B, C, 8, 8), "unet")


# ----------------------------------------------------------------------------------------------------
# §10 item 4: the two CAM normalisations (mixins)
# ----------------------------------------------------------------------------------------------------


def _image() -> torch.Tensor:
    return torch.randn(3, 30, 22, generator=torch.Generator().manual_seed(11))


def _position_cam(x: torch.Tensor) -> torch.Tensor:
    """A raw A that depends on position (flips matter), stride 4: (N, 4, h/4, w/4)."""
    a = F.avg_pool2d(torch.cat([x, x[:, :1] * -1.0], dim=1), 4, ceil_mode=True)
    return a * 5.0 + 1.0


def test_glm_mixin_has_max_one_per_kept_class() -> None:
    keys = torch.tensor([3, 1])
    # GSLM's mixin_multi_cams resizes straight to the image size (issue 13): the shared loop's "full" rule
    record = multiscale_cams(lambda x: F.relu(_position_cam(x)), _image(), keys, high_res="full")
    assert record["high_res"].shape == (2, 30, 22) and record["cam"].shape == (2, 8, 6)
    peaks = record["high_res"].flatten(1).amax(1)
    torch.testing.assert_close(peaks, torch.ones(2), rtol=0, atol=2e-5)
    assert (peaks < 1).all()


def test_wam_mixin_of_eight_maps_equal_to_six_is_one() -> None:
    keys = torch.tensor([0, 2])
    six = _wam_cams(lambda x: torch.full((x.shape[0], 4, 8, 8), 6.0), _image(), keys)
    # 1 up to float32 rounding of the bilinear weights (resizing 8 -> 22 columns: one ulp, 1.2e-7)
    torch.testing.assert_close(six["high_res"], torch.ones_like(six["high_res"]), rtol=0, atol=2.5e-7)
    assert (six["cam"] == 1.0).all()
    assert six["high_res"].shape == (2, 30, 22) and six["keys"].tolist() == [0, 2]
    # via the raw map of the wam head: relu6(10) = 6 -> 1; absolute scale: maps of 3 give 0.5 (P2)
    ten = _wam_cams(lambda x: bounded_cam(torch.full((x.shape[0], 4, 8, 8), 10.0)), _image(), keys)
    torch.testing.assert_close(ten["high_res"], torch.ones_like(ten["high_res"]), rtol=0, atol=2.5e-7)
    three = _wam_cams(lambda x: torch.full((x.shape[0], 4, 8, 8), 3.0), _image(), keys)
    torch.testing.assert_close(three["high_res"], torch.full_like(three["high_res"], 0.5), rtol=0, atol=1.5e-7)
    torch.testing.assert_close(
        wam_normalise(torch.full((2, 2), 48.0), 8), torch.ones(2, 2, dtype=torch.float32)
    )


def test_wam_mixin_is_the_mean_of_the_glm_sum() -> None:
    """Both mixins share the sum over the 8 maps: WAM = sum / (8 * 6), GLM = sum / (max + 1e-5)."""
    keys = torch.tensor([3, 0, 1])
    wam = _wam_cams(lambda x: bounded_cam(_position_cam(x)), _image(), keys)
    glm = multiscale_cams(lambda x: bounded_cam(_position_cam(x)), _image(), keys, high_res="full")
    assert 0.0 <= wam["high_res"].min() and wam["high_res"].max() <= 1.0
    for name in ("cam", "high_res"):
        total = wam[name] * 48.0
        rel = total / (total.flatten(1).amax(1).view(-1, 1, 1) + 1e-5)
        torch.testing.assert_close(rel, glm[name], rtol=1e-5, atol=1e-6)
    assert wam["high_res"].flatten(1).amax(1).min() < 0.99  # absolute, not re-normalised


def test_multiscale_cams_carry_no_gradient() -> None:
    w = torch.ones(1, requires_grad=True)
    record = _wam_cams(lambda x: bounded_cam(_position_cam(x) * w), _image(), torch.tensor([0]))
    assert not record["high_res"].requires_grad and not record["cam"].requires_grad


# ----------------------------------------------------------------------------------------------------
# §10 item 5: seeds (the round driver cuts them with ir_label's constant convention; CRF mocked or tiny)
# ----------------------------------------------------------------------------------------------------


def _driver_seeds(image, cam, keys, crf=None):  # noqa: ANN001, ANN202 - what `lit-wsss ir-labels` runs for the driver
    crf = crf or functools.partial(crf_inference_label, gauss=(3, GSLM_CRF_PARAMS["gaussian"]["compat"]))
    return ir_label(image, np.asarray(cam, np.float32), np.asarray(keys), CONF_FG_THRESHOLD, CONF_BG_THRESHOLD,
                    convention="constant", crf=crf)


def test_seed_rule_on_a_one_class_cam() -> None:
    cam = torch.tensor([[[0.5, 0.2, 0.01], [0.30, 0.05, 0.31]]]).numpy()  # 0.30 / 0.05 ties go to the plane
    y = _driver_seeds(np.zeros((2, 3, 3), np.uint8), cam, [7], crf=lambda image, labels, n: labels)
    assert y.tolist() == [[8, 255, 0], [255, 0, 8]]


def test_seed_conflicts_go_to_the_high_threshold_cut_p7() -> None:
    cam = np.array([[[0.9, 0.1, 0.02]], [[0.2, 0.15, 0.01]]], np.float32)  # classes 4 and 11
    calls: list[np.ndarray] = []

    def crf(image: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
        calls.append(labels.copy())
        if len(calls) == 2:  # the low-confidence map: its CRF flips class 4 -> class 11
            return np.where(labels == 1, 2, labels)
        return labels

    y = _driver_seeds(np.zeros((1, 3, 3), np.uint8), cam, [4, 11], crf=crf)
    assert calls[0].tolist() == [[1, 0, 0]] and calls[1].tolist() == [[1, 2, 0]]  # 0.30 cut first
    assert y.tolist() == [[5, 255, 0]]


def test_gslm_crf_parameters_are_the_specs() -> None:
    """cls.md §2.3: 10 iterations, gt_prob 0.7, Gaussian (3, compat 10), bilateral (50, 5, compat 10); the
    driver passes only the Gaussian compat to ir-labels, whose other parameters must be these."""
    assert GSLM_CRF_PARAMS["gaussian"] == {"sxy": 3, "compat": 10}
    assert (GSLM_CRF_PARAMS["iterations"], GSLM_CRF_PARAMS["gt_prob"]) == (10, 0.7)
    assert GSLM_CRF_PARAMS["bilateral"] == {"sxy": 50, "srgb": 5, "compat": 10}
    assert CRF_PARAMS["gaussian"] == {"sxy": 3, "compat": 3}  # IRN's: the one difference


def test_gslm_crf_runs_on_a_tiny_image() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = 255
    cam = np.zeros((1, 8, 8), np.float32)
    cam[0, :, 4:] = 0.9
    y = _driver_seeds(image, cam, [2])
    assert y.shape == (8, 8)
    assert (y[:, :4] == 0).all() and (y[:, 4:] == 3).all()


# ----------------------------------------------------------------------------------------------------
# §10 item 6 (schedule part): thresholds per round
# ----------------------------------------------------------------------------------------------------


def test_round_threshold_schedule() -> None:
    assert NUM_ROUNDS == 3
    assert [round_thresholds(r).eval_bg for r in range(3)] == [0.15, 0.25, 0.35]
    for r in range(3):
        t = round_thresholds(r)
        assert (t.conf_fg, t.conf_bg) == (0.30, 0.05)
    assert round_thresholds(np.int64(3)).eval_bg == 0.45
    for bad in (-1, 1.0, True):
        with pytest.raises(ValueError, match="round_index"):
            round_thresholds(bad)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# §10 item 7: GLM linearity; P5 nearest label downsampling; shape errors
# ----------------------------------------------------------------------------------------------------


def test_glm_classifier_before_pool_equals_pool_then_classify() -> None:
    g = torch.Generator().manual_seed(12)
    feats = torch.randn(B, 16, 5, 7, generator=g, dtype=DT)
    weight = torch.randn(C, 16, 1, 1, generator=g, dtype=DT)
    a = F.conv2d(feats, weight)  # A = W . F, the module's bias-free 1x1 classifier
    torch.testing.assert_close(gap_logits(a), feats.mean(dim=(2, 3)) @ weight[:, :, 0, 0].T)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=DT)
    x = gap_logits(a)
    torch.testing.assert_close(
        classification_loss(x, y), -(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean()
    )


def test_seed_downsampling_is_nearest_p5() -> None:
    g = torch.Generator().manual_seed(13)
    full = torch.full((2, 512, 512), 255, dtype=torch.long)
    picks = torch.randint(0, 21, (2, 32, 32), generator=g)
    full[:, ::16, ::16] = picks  # legacy nearest reads the top-left pixel of each 16 x 16 block
    small = downsample_seeds(full, (32, 32))
    assert small.dtype == torch.int64 and torch.equal(small, picks)
    assert (downsample_seeds(full, (32, 32), "nearest-exact") == 255).all()  # block centres: all ignore
    full[:, 8::16, 8::16] = picks
    assert torch.equal(downsample_seeds(full, (32, 32), "nearest-exact"), picks)
    same = torch.randint(0, 3, (1, 4, 4), generator=g, dtype=torch.uint8)
    assert torch.equal(downsample_seeds(same, (4, 4)), same.long())


def test_slm_losses_resize_full_size_seeds_and_validate_inputs() -> None:
    a = _cam_logits(14).detach()
    labels, seeds = _labels(), _seeds()
    full = seeds.repeat_interleave(16, dim=1).repeat_interleave(16, dim=2)  # (B, 64, 64)
    logits = gap_logits(a)
    torch.testing.assert_close(slm_losses(logits, a, labels, full), slm_losses(logits, a, labels, seeds))
    with pytest.raises(ValueError, match="seeds"):
        slm_losses(logits, a, labels, seeds.float())
    with pytest.raises(ValueError, match="seed values"):
        bad = seeds.clone()
        bad[0, 0, 0] = C + 1
        slm_losses(logits, a, labels, bad)
    with pytest.raises(ValueError, match="labels"):
        slm_losses(logits, a, labels[:, :2], seeds)
    with pytest.raises(ValueError, match="logits must be"):
        slm_losses(logits[:, :2], a, labels, seeds)
    with pytest.raises(ValueError, match="seeds"):
        seg_loss(bounded_cam(a), labels, seeds[:, :2])
    with pytest.raises(ValueError, match="reduction"):
        seg_loss(bounded_cam(a), labels, seeds, reduction="batchmean")
    with pytest.raises(ValueError, match="tau"):
        bounded_cam(a, 0.0)
    torch.testing.assert_close(max_normalise(torch.zeros(1, 1, 2, 2)), torch.zeros(1, 1, 2, 2))
    assert TAU == 6.0
