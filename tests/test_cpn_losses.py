"""CPN head and losses (cpn.md §3, §5, §10 C2-C8; tests §12 items 2-7 at a tiny size).

Every check compares against numbers worked out independently: hand-computed tiny tensors, explicit
Python loops re-implementing the equations, or invariants.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lit_wsss.losses.cpn import (
    CPN_EPS,
    LOSS_KEYS,
    classification_loss,
    correlation_cam,
    cp_loss,
    cpcr_loss,
    cpn_losses,
    cpr_loss,
    head_features,
    min_max_normalise,
    min_pool_loss,
    pair_weighted_maps,
    pcm,
    pcm_affinity,
    prcm,
    refined_cam,
    spatial_gather,
    winner_take_all,
)

E = CPN_EPS
DT = torch.float64


def _rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(rng.normal(size=shape) * scale)


def _q(a: float) -> float:
    """N([0, a]) at the maximum: (a - eps) / (a + eps)."""
    return (a - E) / (a + E)


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


# --- §12 item 2: N(.) -----------------------------------------------------------------------------


def test_min_max_normalise_hand_computed():
    p = torch.tensor([[[[-1.0, 0.0], [2.0, 4.0]], [[1.0, 2.0], [3.0, 5.0]]]], dtype=DT)
    out = min_max_normalise(p)
    expected = torch.tensor(
        [
            [[0.0, 0.0], [(2 - E) / (4 + E), (4 - E) / (4 + E)]],  # p+ = (0, 0, 2, 4): min 0, max 4
            [[0.0, (1 - E) / (4 + E)], [(2 - E) / (4 + E), (4 - E) / (4 + E)]],  # min 1, max 5
        ],
        dtype=DT,
    )
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-12)


def test_min_max_normalise_invariants():
    rng = np.random.default_rng(0)
    p = _rand(rng, 2, 5, 6, 7, scale=3.0)
    p[0, 1] = 2.5  # spatially constant channel
    p[1, 2] = -1.0  # constant after the ReLU
    out = min_max_normalise(p)
    assert out.min() >= 0 and out.max() < 1
    assert torch.all(out[0, 1] == 0) and torch.all(out[1, 2] == 0)
    peak = out.amax(dim=(-2, -1))
    others = torch.ones_like(peak, dtype=torch.bool)
    others[0, 1] = others[1, 2] = False
    torch.testing.assert_close(peak[others], torch.ones_like(peak[others]), rtol=0, atol=1e-4)


# --- §12 item 3: WTA and the correlation CAM D ----------------------------------------------------


def test_winner_take_all_hand_computed():
    z = torch.tensor([[[3.0, 1.0, -2.0]], [[3.0, 2.0, -1.0]], [[-1.0, 2.0, -3.0]]]).reshape(1, 3, 1, 3)
    expected = torch.tensor([[[3.0, 0.0, 0.0]], [[3.0, 2.0, -1.0]], [[0.0, 2.0, 0.0]]]).reshape(1, 3, 1, 3)
    assert torch.equal(winner_take_all(z), expected)  # ties kept, magnitudes (even negative) kept


def test_winner_take_all_nonzero_entries_are_channel_max():
    rng = np.random.default_rng(1)
    z = torch.from_numpy(rng.integers(0, 4, size=(2, 5, 6, 6)).astype(np.float64))  # many ties
    out = winner_take_all(z)
    mx = z.amax(dim=1, keepdim=True).expand_as(z)
    nz = out != 0
    assert torch.equal(out[nz], mx[nz])
    assert torch.equal(out[z == mx], z[z == mx])  # every maximal entry survives
    assert torch.all(out[z != mx] == 0)


def test_correlation_cam_hand_computed():
    cam = torch.tensor([[7.0, 7.0, 7.0], [2.0, 1.0, -1.0], [1.0, 1.0, 4.0]], dtype=DT).reshape(1, 3, 1, 3)
    d = correlation_cam(cam)
    c1 = [(2 - E) / (2 + E), (1 - E) / (2 + E), 0.0]
    c2 = [(1 - E) / (4 + E), (1 - E) / (4 + E), (4 - E) / (4 + E)]
    fg1 = [c1[0], c1[1], 0.0]  # pixel 2: class 2 wins
    fg2 = [0.0, 0.0, c2[2]]
    bg = [1 - max(a, b) for a, b in zip(c1, c2)]
    torch.testing.assert_close(
        d, torch.tensor([bg, fg1, fg2], dtype=DT).reshape(1, 3, 1, 3), rtol=0, atol=1e-12
    )


def test_correlation_cam_ties_no_grad_not_masked():
    rng = np.random.default_rng(2)
    cam = _rand(rng, 2, 4, 5, 5)
    cam[:, 2] = cam[:, 1]  # identical classes: tie everywhere, both kept
    cam.requires_grad_(True)
    d = correlation_cam(cam)
    assert not d.requires_grad
    torch.testing.assert_close(d[:, 1], d[:, 2], rtol=0, atol=0)
    fg = d[:, 1:]
    assert torch.all((fg == 0) | (fg == fg.amax(dim=1, keepdim=True)))
    torch.testing.assert_close(d[:, 0], 1 - fg.amax(dim=1), rtol=0, atol=1e-12)
    # channel 0 of the input is discarded; every class map is present (no label mask)
    cam2 = cam.detach().clone()
    cam2[:, 0] = 100.0
    assert torch.equal(correlation_cam(cam2), d)
    assert torch.all(d[:, 1:].amax(dim=(-2, -1)) > 0.5)


# --- §3 region gather and head features ----------------------------------------------------------


def test_spatial_gather_matches_loops():
    rng = np.random.default_rng(3)
    b, k, cf, h, w = 2, 3, 4, 2, 3
    d = torch.from_numpy(rng.uniform(size=(b, k, h, w)))
    f = _rand(rng, b, cf, h, w)
    out = spatial_gather(d, f)
    assert out.shape == (b, k, cf)
    ref = torch.zeros(b, k, cf, dtype=DT)
    for bi in range(b):
        for ki in range(k):
            ex = [math.exp(float(d[bi, ki].flatten()[i])) for i in range(h * w)]
            z = sum(ex)
            for c in range(cf):
                ref[bi, ki, c] = sum(ex[i] / z * float(f[bi, c].flatten()[i]) for i in range(h * w))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # a constant D gives uniform weights: the plain spatial mean of f
    const = spatial_gather(torch.full_like(d, 0.3), f)
    torch.testing.assert_close(const, f.mean(dim=(-2, -1))[:, None].expand(b, k, cf), rtol=1e-10, atol=1e-12)


def test_head_features_resize_and_relu():
    rng = np.random.default_rng(4)
    image = _rand(rng, 2, 3, 9, 13)
    low, high = _rand(rng, 2, 4, 4, 5), _rand(rng, 2, 6, 4, 5)
    f = head_features(image, low, high)
    assert f.shape == (2, 3 + 4 + 6, 4, 5)
    for r, c in [(0, 0), (-1, -1), (0, -1), (-1, 0)]:  # align_corners=True keeps the corner pixels
        torch.testing.assert_close(f[:, :3, r, c], image[:, :, r, c], rtol=0, atol=1e-12)
    assert torch.equal(f[:, 3:7], low.clamp_min(0)) and torch.equal(f[:, 7:], high.clamp_min(0))
    with pytest.raises(ValueError):
        head_features(image, low, high[..., :3])


# --- §12 item 5: PRCM (reshape semantics) ---------------------------------------------------------


def _prcm_loops(region, f, w9, w10, transpose: bool) -> torch.Tensor:
    b, k, cf = region.shape
    o = w9.shape[0]
    h, w = f.shape[-2:]
    ff = f.reshape(b, cf, h * w)
    out = torch.zeros(b, k, h * w, dtype=DT)
    for bi in range(b):
        kt = [
            [max(0.0, sum(float(w10[oi, c] * region[bi, ki, c]) for c in range(cf))) for ki in range(k)]
            for oi in range(o)
        ]  # Kt[o][k], the (O, K, 1) layout
        q = [
            [max(0.0, sum(float(w9[oi, c] * ff[bi, c, i]) for c in range(cf))) for i in range(h * w)]
            for oi in range(o)
        ]
        for kk in range(k):
            if transpose:
                key = [kt[oi][kk] for oi in range(o)]
            else:  # memory of (O, K) read back as (K, O): flat index kk * O + c
                key = [kt[(kk * o + c) // k][(kk * o + c) % k] for c in range(o)]
            energy = [sum(key[oi] * q[oi][i] for oi in range(o)) / math.sqrt(k) for i in range(h * w)]
            mx = max(energy)
            ex = [math.exp(v - mx) for v in energy]
            for i in range(h * w):
                out[bi, kk, i] = ex[i] / sum(ex)
    return out.reshape(b, k, h, w)


def _conv(weight: torch.Tensor):
    """A weight matrix (O, I) as the bias-free 1x1 convolution the module's f9 / f10 layers are."""
    return lambda x: F.conv2d(x, weight.reshape(weight.shape[0], -1, 1, 1))


def _prcm_inputs(seed: int, k: int = 3):
    rng = np.random.default_rng(seed)
    b, cf, o, h, w = 2, 5, 4, 2, 3
    return _rand(rng, b, k, cf), _rand(rng, b, cf, h, w), _rand(rng, o, cf), _rand(rng, o, cf)


def test_prcm_matches_reshape_loops_and_differs_from_transpose():
    region, f, w9, w10 = _prcm_inputs(5)
    p = prcm(region, f, _conv(w9), _conv(w10))
    assert p.shape == (2, 3, 2, 3)
    assert p.min() >= 0
    torch.testing.assert_close(p.sum(dim=(-2, -1)), torch.ones(2, 3, dtype=DT), rtol=0, atol=1e-12)
    torch.testing.assert_close(p, _prcm_loops(region, f, w9, w10, transpose=False), rtol=1e-9, atol=1e-12)
    pt = prcm(region, f, _conv(w9), _conv(w10), key_transpose=True)
    torch.testing.assert_close(pt, _prcm_loops(region, f, w9, w10, transpose=True), rtol=1e-9, atol=1e-12)
    assert (p - pt).abs().max() > 1e-3
    # the module's layers: nn.Conv2d 1x1 without bias holding these weights
    layers = [torch.nn.Conv2d(5, 4, 1, bias=False).double() for _ in range(2)]
    for layer, weight in zip(layers, (w9, w10)):
        layer.weight.data.copy_(weight[..., None, None])
    torch.testing.assert_close(prcm(region, f, *layers), p)


def test_prcm_single_class_reshape_equals_transpose():
    region, f, w9, w10 = _prcm_inputs(6, k=1)  # (O, 1) and (1, O) share one memory layout
    torch.testing.assert_close(prcm(region, f, _conv(w9), _conv(w10)),
                               prcm(region, f, _conv(w9), _conv(w10), key_transpose=True))


# --- §12 item 4: PCM -------------------------------------------------------------------------------


def test_pcm_matches_loops():
    rng = np.random.default_rng(7)
    b, k, cf, o, h, w = 1, 3, 4, 5, 2, 3
    d = torch.from_numpy(rng.uniform(size=(b, k, h, w)))
    f, w9 = _rand(rng, b, cf, h, w), _rand(rng, o, cf)
    n = h * w
    ff = f.reshape(cf, n)
    g = [[sum(float(w9[oi, c] * ff[c, i]) for c in range(cf)) for oi in range(o)] for i in range(n)]
    g = [[v / (math.sqrt(sum(x * x for x in gi)) + E) for v in gi] for gi in g]
    a = [[max(0.0, sum(g[i][oi] * g[j][oi] for oi in range(o))) for j in range(n)] for i in range(n)]
    col = [sum(a[i][j] for i in range(n)) for j in range(n)]
    a = [[a[i][j] / (col[j] + E) for j in range(n)] for i in range(n)]
    torch.testing.assert_close(pcm_affinity(f, _conv(w9))[0], torch.tensor(a, dtype=DT), rtol=1e-9, atol=1e-12)
    dd = d.reshape(k, n)
    y = [[sum(float(dd[kk, i]) * a[i][j] for i in range(n)) for j in range(n)] for kk in range(k)]
    torch.testing.assert_close(
        pcm(d, f, _conv(w9)), torch.tensor(y, dtype=DT).reshape(b, k, h, w), rtol=1e-9, atol=1e-12
    )


def test_pcm_invariants():
    rng = np.random.default_rng(8)
    b, k, cf, o, h, w = 2, 4, 6, 5, 5, 6
    f, w9 = _rand(rng, b, cf, h, w), _rand(rng, o, cf)
    f[0, :, 1, 1] = 0  # an all-zero feature pixel: its column of A is zero
    a = pcm_affinity(f, _conv(w9))
    cols = a.sum(dim=1)
    nonzero = cols > 0
    assert not nonzero[0, 1 * w + 1] and nonzero.sum() == b * h * w - 1
    torch.testing.assert_close(cols[nonzero], torch.ones_like(cols[nonzero]), rtol=0, atol=1e-4)
    y_const = pcm(torch.full((b, k, h, w), 0.7, dtype=DT), f, _conv(w9))
    ref = torch.full_like(y_const, 0.7)
    ref[0, :, 1, 1] = 0
    torch.testing.assert_close(y_const, ref, rtol=0, atol=1e-4)
    y = pcm(torch.from_numpy(rng.uniform(size=(b, k, h, w))), f, _conv(w9))
    assert y.min() >= 0 and y.max() <= 1


# --- §3 whole head ---------------------------------------------------------------------------------


def test_refined_cam_composition_and_gradient_routing():
    rng = np.random.default_rng(9)
    b, k, h, w = 2, 3, 2, 3
    cam = _rand(rng, b, k, h, w, scale=2.0).requires_grad_(True)
    image = _rand(rng, b, 3, 5, 9)
    low = _rand(rng, b, 2, h, w).requires_grad_(True)
    high = _rand(rng, b, 3, h, w).requires_grad_(True)
    w9 = _rand(rng, 4, 8).requires_grad_(True)
    w10 = _rand(rng, 4, 8).requires_grad_(True)
    out = refined_cam(cam, image, low, high, _conv(w9), _conv(w10))
    # independent reference: D by formula, f by hand, PCM/PRCM/gather by the loops above
    with torch.no_grad():
        c = cam.clamp_min(0)
        c = (c - E).clamp_min(0) / (c.amax(dim=(-2, -1), keepdim=True) + E)
        fg = torch.where(c[:, 1:] >= c[:, 1:].amax(dim=1, keepdim=True), c[:, 1:], 0.0)
        d = torch.cat([1 - c[:, 1:].amax(dim=1, keepdim=True), fg], dim=1)
        f = torch.cat(
            [
                F.interpolate(image, size=(h, w), mode="bilinear", align_corners=True),
                low.clamp_min(0),
                high.clamp_min(0),
            ],
            dim=1,
        )
        region = torch.zeros(b, k, 8, dtype=DT)
        for bi in range(b):
            for ki in range(k):
                wts = torch.softmax(d[bi, ki].flatten(), 0)
                region[bi, ki] = (f[bi].reshape(8, -1) * wts).sum(-1)
        p = _prcm_loops(region, f, w9, w10, transpose=False)
        ref = pcm(d, f, _conv(w9)) + p * d
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-12)
    g_cam, g_low, g_high, g9, g10 = _grads(out.square().sum(), [cam, low, high, w9, w10])
    assert torch.all(g_cam == 0)  # D carries no gradient: fc8 learns only through the raw CAM
    for g in (g_low, g_high, g9, g10):
        assert g.abs().sum() > 0


# --- §5 min-pooling and classification --------------------------------------------------------------


def test_min_pool_loss_hand_computed():
    z = torch.tensor([[[[-1.0, 3.0, 0.5, 2.0]], [[-2.0, 1.0, 0.2, 5.0]]]])  # (1, 2, 1, 4)
    # max over channels (-1, 3, 0.5, 5); lowest 2: -1, 0.5; relu-sum 0.5 / (k=2 * B=1)
    torch.testing.assert_close(min_pool_loss(z, fraction=0.5), torch.tensor(0.25))
    with pytest.raises(ValueError):
        min_pool_loss(z, fraction=0.1)  # k = 0


def _min_pool_loops(z: torch.Tensor, fraction: float) -> float:
    b, c, h, w = z.shape
    k = int(fraction * h * w)
    total = 0.0
    for bi in range(b):
        peaks = sorted(max(float(z[bi, ci, i, j]) for ci in range(c)) for i in range(h) for j in range(w))
        total += sum(max(0.0, v) for v in peaks[:k])
    return total / (k * b)


def test_min_pool_loss_matches_loops():
    rng = np.random.default_rng(10)
    z = _rand(rng, 3, 4, 6, 6)
    assert float(min_pool_loss(z)) == pytest.approx(_min_pool_loops(z, 0.25), rel=1e-12)


def _labels() -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=DT)  # (B=2, C=3), K = 4


def test_classification_loss_matches_formula():
    rng = np.random.default_rng(11)
    cams = [_rand(rng, 2, 4, 6, 6) for _ in range(3)]
    refined = [_rand(rng, 2, 4, 6, 6) for _ in range(3)]
    y = _labels()
    ref = 0.0
    for c, r in zip(cams, refined):
        for bi in range(2):
            for ci in range(3):
                s = float(c[bi, ci + 1].mean())
                yy = float(y[bi, ci])
                ref -= (
                    yy * math.log(1 / (1 + math.exp(-s))) + (1 - yy) * math.log(1 / (1 + math.exp(s)))
                ) / 6
        masked = r[:, 1:] * y[:, :, None, None]
        ref += _min_pool_loops(masked, 0.25)
    ref /= 3
    out = classification_loss(cams, refined, y)
    assert float(out) == pytest.approx(ref, rel=1e-10)
    cams[0][:, 0] = 1e3  # channel 0 never enters L_cls
    assert float(classification_loss(cams, refined, y)) == pytest.approx(ref, rel=1e-10)


# --- §5 CP / CPR / CPCR ---------------------------------------------------------------------------


def _pix(*vals: list[float]) -> torch.Tensor:
    """(1, K, 1, W) from per-channel pixel lists."""
    return torch.tensor(vals, dtype=DT)[None, :, None, :]


def test_cp_and_cpr_hand_computed():
    rho = torch.tensor([0.5], dtype=DT)
    c0, c1, c2 = _pix([9, 9], [0, 1], [4, 4]), _pix([9, 9], [1, 0], [4, 4]), _pix([9, 9], [0, 1], [4, 4])
    y = torch.tensor([[1.0, 0.0]], dtype=DT)  # class 2 absent: zeroed but counted in the mean
    q = _q(1.0)
    # c^0 = (0, q), c^1 = 0.5 (q, 0), c^2 = 0.5 (0, q) on class 1; |sg(c^1 + c^2) - c^0| = (q/2, q/2)
    assert float(cp_loss(*pair_weighted_maps([c0, c1, c2], rho, y))) == pytest.approx(0.25 * q, rel=1e-12)
    r0, r1, r2 = _pix([9, 9], [0, 1], [4, 4]), _pix([9, 9], [1, 0], [4, 4]), _pix([9, 9], [1, 1], [4, 4])
    # r^2 = 0 (constant map); r^0 - r^1 - r^2 = (-q/2, q) on class 1
    assert float(cpr_loss(*pair_weighted_maps([r0, r1, r2], rho, y))) == pytest.approx(0.375 * q, rel=1e-12)


def test_cpcr_hand_computed_background_overwrite_and_wta():
    # single pixel, K = 2: channel 0 inputs are garbage (overwritten by 1 - max fg)
    c_hat = (_pix([5.0], [0.8]), _pix([5.0], [0.3]), _pix([5.0], [0.6]))
    r_hat = (_pix([5.0], [0.0]), _pix([5.0], [0.5]), _pix([5.0], [0.1]))
    # c0 = (.2, .8), c1 = (.7, .3), c2 = (.4, .6); WTA(c0 - c1) = (0, .5), WTA(c0 - c2) = (0, .2)
    # r2 = (.9, .1) -> E1 = (.9, .4);  r1 = (.5, .5) -> E2 = (.5, .3)
    assert float(cpcr_loss(c_hat, r_hat, ohem_ratio=0.5)) == pytest.approx(0.9 + 0.5)  # k = 1
    assert float(cpcr_loss(c_hat, r_hat, ohem_ratio=1.0)) == pytest.approx(0.65 + 0.4)  # k = 2


def test_cpcr_ohem_k_counts_all_channels():
    zeros = torch.zeros(1, 3, 3, 3, dtype=DT)
    c_hat = (zeros, zeros, zeros)
    # targets 0; every refined map becomes (1, 0, 0) per pixel -> 9 entries of 1 among 27
    assert float(cpcr_loss(c_hat, c_hat, ohem_ratio=0.2)) == pytest.approx(2.0)  # k = int(5.4) = 5
    assert float(cpcr_loss(c_hat, c_hat, ohem_ratio=0.5)) == pytest.approx(2 * 9 / 13)  # k = 13


def test_cpcr_ohem_is_per_image():
    # image 0 as in the hand-computed test (E1 = (.9, .4), E2 = (.5, .3)); image 1: E1 = E2 = (.1, 0)
    c_hat = tuple(
        torch.cat([a, b])
        for a, b in zip(
            (_pix([0.0], [0.8]), _pix([0.0], [0.3]), _pix([0.0], [0.6])),
            (_pix([0.0], [0.9]), _pix([0.0], [0.0]), _pix([0.0], [0.0])),
        )
    )
    r_hat = tuple(
        torch.cat([a, b])
        for a, b in zip(
            (_pix([0.0], [0.0]), _pix([0.0], [0.5]), _pix([0.0], [0.1])),
            (_pix([0.0], [0.0]), _pix([0.0], [0.9]), _pix([0.0], [0.9])),
        )
    )
    # per image k = 1: (.9 + .1) / 2 + (.5 + .1) / 2 = 0.8 (a batch-wide top-2 would give 1.05)
    assert float(cpcr_loss(c_hat, r_hat, ohem_ratio=0.5)) == pytest.approx(0.8)


def _cpcr_loops(c_hat, r_hat, ratio: float) -> float:
    b, k, h, w = c_hat[0].shape

    def bg(z, bi, i, j):
        return [1 - max(float(z[bi, kk, i, j]) for kk in range(1, k))] + [
            float(z[bi, kk, i, j]) for kk in range(1, k)
        ]

    total = 0.0
    for ca, cb, r in ((0, 1, 2), (0, 2, 1)):
        per_image = []
        for bi in range(b):
            errs = []
            for i in range(h):
                for j in range(w):
                    diff = [x - y for x, y in zip(bg(c_hat[ca], bi, i, j), bg(c_hat[cb], bi, i, j))]
                    target = [v if v == max(diff) else 0.0 for v in diff]
                    errs += [abs(t - p) for t, p in zip(target, bg(r_hat[r], bi, i, j))]
            top = sorted(errs, reverse=True)[: int(ratio * k * h * w)]
            per_image.append(sum(top) / len(top))
        total += sum(per_image) / b
    return total


def test_cpcr_matches_loops():
    rng = np.random.default_rng(12)
    c_hat = tuple(torch.from_numpy(rng.uniform(size=(2, 4, 3, 3))) for _ in range(3))
    r_hat = tuple(torch.from_numpy(rng.uniform(size=(2, 4, 3, 3))) for _ in range(3))
    assert float(cpcr_loss(c_hat, r_hat)) == pytest.approx(_cpcr_loops(c_hat, r_hat, 0.2), rel=1e-12)


def _triplets(seed: int, requires_grad: bool = False):
    rng = np.random.default_rng(seed)
    cams = [_rand(rng, 2, 4, 5, 5, scale=2.0).requires_grad_(requires_grad) for _ in range(3)]
    refined = [
        torch.from_numpy(rng.uniform(size=(2, 4, 5, 5))).requires_grad_(requires_grad) for _ in range(3)
    ]
    return cams, refined, torch.tensor([0.6, 0.3], dtype=DT)


def test_cpn_losses_match_independent_reference():
    cams, refined, rho = _triplets(13)
    y = _labels()
    out = cpn_losses(cams, refined, rho, y)
    assert set(out) == set(LOSS_KEYS)
    y4 = torch.cat([torch.ones(2, 1, dtype=DT), y], 1)

    def hat(maps):
        res = []
        for t, m in enumerate(maps):
            n = torch.zeros_like(m)
            for bi in range(2):
                for kk in range(4):
                    p = m[bi, kk].clamp_min(0)
                    n[bi, kk] = (p - p.min() - E).clamp_min(0) / (p.max() - p.min() + E) * y4[bi, kk]
            scale = [torch.ones(2, dtype=DT), rho, 1 - rho][t]
            res.append(n * scale[:, None, None, None])
        return res

    with torch.no_grad():
        ch, rh = hat(cams), hat(refined)
        cp = float((ch[1] + ch[2] - ch[0])[:, 1:].abs().mean())
        cpr = float((rh[0] - rh[1] - rh[2])[:, 1:].abs().mean())
    assert float(out["cp"]) == pytest.approx(cp, rel=1e-12)
    assert float(out["cpr"]) == pytest.approx(cpr, rel=1e-12)
    assert float(out["cpcr"]) == pytest.approx(_cpcr_loops(ch, rh, 0.2), rel=1e-12)
    assert float(out["cls"]) == pytest.approx(float(classification_loss(cams, refined, y)), rel=1e-12)


def test_cpn_losses_do_not_modify_inputs():
    cams, refined, rho = _triplets(14, requires_grad=True)
    before = [m.detach().clone() for m in cams + refined]
    losses = cpn_losses(cams, refined, rho, _labels())
    sum(losses.values()).backward()  # no in-place error either
    for m, b in zip(cams + refined, before):
        assert torch.equal(m.detach(), b)


# --- §12 item 6: nothing hidden -> L_cp = 0 ---------------------------------------------------------


@pytest.mark.parametrize("pass2", ["zero", "arbitrary"])
def test_cp_zero_when_nothing_hidden(pass2: str):
    cams, refined, _ = _triplets(15)
    cams[1], refined[1] = cams[0].clone(), refined[0].clone()
    if pass2 == "zero":
        cams[2], refined[2] = torch.zeros_like(cams[0]), torch.zeros_like(refined[0])
    out = cpn_losses(cams, refined, torch.ones(2, dtype=DT), _labels())
    assert float(out["cp"]) == 0.0
    assert float(out["cpr"]) == 0.0
    # control: with a partial rho the same maps give a positive loss
    assert float(cpn_losses(cams, refined, torch.full((2,), 0.5, dtype=DT), _labels())["cp"]) > 0


# --- §12 item 7: gradient routing (C3) ------------------------------------------------------------


def test_gradient_routing():
    cams, refined, rho = _triplets(16, requires_grad=True)
    inputs = cams + refined
    out = cpn_losses(cams, refined, rho, _labels())

    def nonzero(loss):
        return [bool(g.abs().sum() > 0) for g in _grads(loss, inputs)]

    #                          c0     c1     c2     r0     r1     r2
    assert nonzero(out["cp"]) == [True, False, False, False, False, False]
    assert nonzero(out["cpr"]) == [False, False, False, True, True, True]
    assert nonzero(out["cpcr"]) == [False, False, False, False, True, True]
    assert nonzero(out["cls"]) == [True] * 6
    # channel 0 ("background" of fc8 and of the refined CAM) receives no loss gradient at all
    for g in _grads(sum(out.values()), inputs):
        assert torch.all(g[:, 0] == 0) and g[:, 1:].abs().sum() > 0


# --- validation -----------------------------------------------------------------------------------


def test_shape_validation():
    cams, refined, rho = _triplets(17)
    with pytest.raises(ValueError, match="labels"):
        cpn_losses(cams, refined, rho, torch.ones(2, 4, dtype=DT))  # (B, K) instead of (B, C)
    with pytest.raises(ValueError, match="rho"):
        cpn_losses(cams, refined, torch.ones(3, dtype=DT), _labels())
    with pytest.raises(ValueError, match="three"):
        cpn_losses(cams[:2], refined, rho, _labels())
    with pytest.raises(ValueError):
        cpn_losses(cams, [r[..., :4] for r in refined], rho, _labels())
    with pytest.raises(ValueError, match="ohem_ratio"):
        cpcr_loss(cams, refined, ohem_ratio=0.001)
