"""VWE core functions (vwe.md §2, §3, §4, §7, §8; tests §10 items 1-5, 7 (background score) and 8).

Every check compares against numbers worked out independently: hand-computed tiny tensors, explicit
Python loops re-implementing the equations, or invariants. Gradient routing is checked with
``torch.autograd.grad`` for every detach the spec names.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_wsss.cams import fuse_flip_pair, multiscale_cams
from lit_wsss.losses.vwe import (
    CAM_NORM_EPS,
    LOSS_WEIGHTS,
    MEMORY_BANK_EPS,
    decov_loss,
    hard_word_assignment,
    hspp,
    init_codebook,
    memory_bank_init,
    memory_bank_step,
    memory_bank_update,
    vwe_losses,
    word_assignment,
    word_entropy,
    word_histogram,
    word_labels,
)

DT = torch.float64
B, C, D, K = 2, 3, 6, 5


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _is_zero(g: torch.Tensor) -> bool:
    return bool(g.abs().sum() == 0)


def _labels() -> torch.Tensor:
    return torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], dtype=DT)


# --- reference implementations by explicit loops -----------------------------------------------------


def _hspp_loop(feat: torch.Tensor, gamma: float = 2.0, levels=(1, 2, 4)) -> torch.Tensor:
    """HSPP with the official kernel rule, by explicit loops over cells (vwe.md §2)."""
    b, d, h, w = feat.shape
    out = torch.zeros(b, d, dtype=feat.dtype)
    for bi in range(b):
        for di in range(d):
            x = feat[bi, di]
            total = gamma * x.mean().item()
            for s in levels:
                kh, kw = h // s, w // s
                maxima = [
                    x[ci * kh:(ci + 1) * kh, cj * kw:(cj + 1) * kw].max().item()
                    for ci in range(h // kh)
                    for cj in range(w // kw)
                ]
                total += sum(maxima) / len(maxima)
            out[bi, di] = total / (gamma + len(levels))
    return out


def _cos(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _assignment_loop(feat: torch.Tensor, codebook: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    b, d, h, w = feat.shape
    k = codebook.shape[0]
    out = torch.zeros(b, k, h, w, dtype=DT)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                v = feat[bi, :, i, j].tolist()
                e = [math.exp(_cos(codebook[kk].tolist(), v) / temperature) for kk in range(k)]
                for kk in range(k):
                    out[bi, kk, i, j] = e[kk] / sum(e)
    return out


def _mlsm_loop(x: torch.Tensor, y: torch.Tensor) -> float:
    """multilabel_soft_margin_loss: mean over batch of the mean over classes of the sigmoid BCE."""
    total = 0.0
    for bi in range(x.shape[0]):
        row = 0.0
        for c in range(x.shape[1]):
            xv, yv = x[bi, c].item(), y[bi, c].item()
            row -= yv * math.log(1 / (1 + math.exp(-xv))) + (1 - yv) * math.log(1 / (1 + math.exp(xv)))
        total += row / x.shape[1]
    return total / x.shape[0]


# --- §10 item 1: HSPP formula ------------------------------------------------------------------------


def test_hspp_constant_tensor_returns_constant():
    values = torch.tensor([[-1.5, 0.0, 3.25], [2.0, 7.0, -0.5]], dtype=DT)
    for h, w in [(32, 32), (11, 9), (4, 4)]:
        feat = values[:, :, None, None].expand(2, 3, h, w).contiguous()
        torch.testing.assert_close(hspp(feat), values, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_hspp_matches_manual_formula_32(dtype, tol):
    feat = torch.randn(2, 3, 32, 32, generator=_gen(1), dtype=DT)
    expected = torch.zeros(2, 3, dtype=DT)
    for bi in range(2):
        for c in range(3):
            x = feat[bi, c]
            m2 = [x[16 * i:16 * (i + 1), 16 * j:16 * (j + 1)].max().item() for i in range(2) for j in range(2)]
            m4 = [x[8 * i:8 * (i + 1), 8 * j:8 * (j + 1)].max().item() for i in range(4) for j in range(4)]
            expected[bi, c] = 0.4 * x.mean() + 0.2 * x.max() + 0.2 * sum(m2) / 4 + 0.2 * sum(m4) / 16
    out = hspp(feat.to(dtype))
    assert out.shape == (2, 3)
    torch.testing.assert_close(out.to(DT), expected, rtol=0, atol=tol)


def test_hspp_odd_size_uses_kernel_rule_not_adaptive():
    # h=11, s=4: kernel 2, 5 cells per side (row 10 dropped); w=9, s=2: kernel 4, 2 cells (column 8 dropped).
    feat = torch.randn(1, 2, 11, 9, generator=_gen(2), dtype=DT)
    feat[0, :, 10, :] = 50.0  # only in the dropped last row: must not reach any cell max but the global one
    expected = _hspp_loop(feat)
    torch.testing.assert_close(hspp(feat), expected, rtol=0, atol=1e-12)
    # by hand for the s=4 grid: 5 x 4 cells of 2 x 2 (rows 0-9, columns 0-7)
    x = feat[0, 0]
    cells4 = [x[2 * i:2 * i + 2, 2 * j:2 * j + 2].max().item() for i in range(5) for j in range(4)]
    cells2 = [x[5 * i:5 * i + 5, 4 * j:4 * j + 4].max().item() for i in range(2) for j in range(2)]
    by_hand = (2 * x.mean().item() + 50.0 + sum(cells2) / 4 + sum(cells4) / 20) / 5
    assert hspp(feat)[0, 0].item() == pytest.approx(by_hand, abs=1e-12)
    assert not torch.allclose(hspp(feat, adaptive_cells=True), expected)


def test_hspp_adaptive_equals_rule_when_divisible_and_gamma_levels():
    feat = torch.randn(2, 3, 8, 12, generator=_gen(3), dtype=DT)
    torch.testing.assert_close(hspp(feat, adaptive_cells=True), hspp(feat), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        hspp(feat, gamma=0.5, levels=(1, 4)), _hspp_loop(feat, 0.5, (1, 4)), rtol=0, atol=1e-12
    )


def test_hspp_errors():
    with pytest.raises(ValueError, match="smaller than pyramid level"):
        hspp(torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"\(B, D, h, w\)"):
        hspp(torch.zeros(2, 3, 8))


# --- §10 item 2: HSPP >= GAP -------------------------------------------------------------------------


def test_hspp_at_least_gap_equality_iff_constant():
    feat = torch.randn(2, 4, 8, 8, generator=_gen(4), dtype=DT)
    feat[0, 1] = 0.7  # spatially constant channels
    feat[1, 3] = -2.0
    feat[1, 0] = 0.0
    feat[1, 0, 5, 6] = 1e-3  # a single deviating pixel: not constant
    pooled, gap = hspp(feat), feat.mean(dim=(-2, -1))
    assert bool((pooled >= gap - 1e-12).all())
    constant = torch.zeros(2, 4, dtype=torch.bool)
    constant[0, 1] = constant[1, 3] = True
    assert torch.allclose(pooled[constant], gap[constant], rtol=0, atol=1e-12)
    assert bool((pooled[~constant] > gap[~constant]).all())


# --- §10 item 3: visual word encoder -----------------------------------------------------------------


def test_word_assignment_hand_computed():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]], dtype=DT)  # norms differ on purpose
    feat = torch.tensor([[3.0, -1.0], [4.0, -0.2]], dtype=DT).reshape(1, 2, 1, 2)  # pixels (3,4), (-1,-0.2)
    s = word_assignment(feat, codebook)
    # pixel (3, 4): cosines (0.6, 0.8, -0.6)
    e = [math.exp(0.6), math.exp(0.8), math.exp(-0.6)]
    assert s[0, :, 0, 0].tolist() == pytest.approx([v / sum(e) for v in e], abs=1e-12)
    # pixel (-1, -0.2): cosines (-1, -0.2, 1) / sqrt(1.04) * (1, 1, 1)
    n = math.sqrt(1.04)
    e = [math.exp(-1 / n), math.exp(-0.2 / n), math.exp(1 / n)]
    assert s[0, :, 0, 1].tolist() == pytest.approx([v / sum(e) for v in e], abs=1e-12)
    assert word_labels(s).tolist() == [[0.0, 1.0, 1.0]]
    # conv-weight shaped codebook gives the same
    torch.testing.assert_close(word_assignment(feat, codebook[:, :, None, None]), s)


def test_word_assignment_matches_loop_and_temperature():
    feat = torch.randn(B, D, 3, 4, generator=_gen(5), dtype=DT)
    codebook = torch.randn(K, D, generator=_gen(6), dtype=DT)
    torch.testing.assert_close(word_assignment(feat, codebook), _assignment_loop(feat, codebook), rtol=0, atol=1e-12)
    hot = word_assignment(feat, codebook, temperature=0.1)
    torch.testing.assert_close(hot, _assignment_loop(feat, codebook, 0.1), rtol=0, atol=1e-12)
    assert torch.equal(hot.argmax(1), word_assignment(feat, codebook).argmax(1))  # argmax unaffected (P5)
    with pytest.raises(ValueError, match="temperature"):
        word_assignment(feat, codebook, temperature=0.0)


def test_assignment_sums_to_one_and_histogram_sums_to_hw():
    h, w = 5, 7
    feat = torch.randn(B, D, h, w, generator=_gen(7), dtype=DT)
    s = word_assignment(feat, torch.randn(K, D, generator=_gen(8), dtype=DT))
    torch.testing.assert_close(s.sum(1), torch.ones(B, h, w, dtype=DT), rtol=0, atol=1e-12)
    hist = word_histogram(s)
    assert hist.shape == (B, K)
    torch.testing.assert_close(hist.sum(1), torch.full((B,), float(h * w), dtype=DT), rtol=0, atol=1e-10)
    # explicit sum over locations of one bin
    assert hist[1, 3].item() == pytest.approx(sum(s[1, 3, i, j].item() for i in range(h) for j in range(w)))
    torch.testing.assert_close(word_histogram(s, normalise=True), hist / (h * w))


@pytest.mark.parametrize("h,w,k", [(2, 2, 7), (4, 6, 5), (1, 1, 3)])
def test_word_label_count_bounds(h, w, k):
    for seed in range(5):
        s = word_assignment(
            torch.randn(3, D, h, w, generator=_gen(seed), dtype=DT), torch.randn(k, D, generator=_gen(99), dtype=DT)
        )
        y = word_labels(s)
        assert set(y.unique().tolist()) <= {0.0, 1.0}
        counts = y.sum(1)
        assert bool((counts >= 1).all()) and bool((counts <= min(k, h * w)).all())
        # y_word[b, k] = 1 iff k is the argmax at one pixel at least, by loop
        for bi in range(3):
            winners = {int(s[bi, :, i, j].argmax()) for i in range(h) for j in range(w)}
            assert [kk for kk in range(k) if y[bi, kk] == 1] == sorted(winners)


def test_word_labels_hand_and_valid_mask():
    s = torch.zeros(2, 4, 1, 3, dtype=DT)
    s[0, 2, 0, :] = 1.0  # all pixels vote word 2
    s[1, 0, 0, 0] = s[1, 3, 0, 1] = s[1, 3, 0, 2] = 1.0
    s[1, 1, 0, 2] = 1.0  # tie at pixel 2 between words 1 and 3 -> lowest index (1)
    assert word_labels(s).tolist() == [[0, 0, 1, 0], [1, 1, 0, 1]]
    valid = torch.tensor([[[True, True, True]], [[False, True, False]]])  # padding does not vote
    assert word_labels(s, valid).tolist() == [[0, 0, 1, 0], [0, 0, 0, 1]]
    assert not word_labels(s.requires_grad_()).requires_grad
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        word_labels(s, valid[:, 0])


def test_assignment_invariant_to_positive_scaling():
    feat = torch.randn(B, D, 4, 4, generator=_gen(9), dtype=DT)
    codebook = torch.randn(K, D, generator=_gen(10), dtype=DT)
    s = word_assignment(feat, codebook)
    torch.testing.assert_close(word_assignment(3.7 * feat, codebook), s, rtol=0, atol=1e-12)
    torch.testing.assert_close(word_assignment(feat, 0.02 * codebook), s, rtol=0, atol=1e-12)
    assert not torch.allclose(word_assignment(-feat, codebook), s)  # a negative scale does change it


def test_codebook_init_std():
    cb = init_codebook(256, 2048, generator=_gen(11))
    assert cb.shape == (256, 2048)
    assert cb.std().item() == pytest.approx(1 / math.sqrt(3 * 2048), rel=0.02)  # ≈ 0.0128 (vwe.md §5)
    assert abs(cb.mean().item()) < 1e-3
    torch.testing.assert_close(init_codebook(4, 8, generator=_gen(3)), init_codebook(4, 8, generator=_gen(3)))


# --- §2 / §7: losses against explicit loops ----------------------------------------------------------


def _heads(seed: int = 20) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {
        "features": torch.randn(B, D, 4, 4, generator=g, dtype=DT),
        "cls_weight": torch.randn(C, D, generator=g, dtype=DT) * 0.5,
        "codebook": torch.randn(K, D, generator=g, dtype=DT),
        "word_weight": torch.randn(K, D, 1, 1, generator=g, dtype=DT) * 0.5,
        "w2i_weight": torch.randn(C, K, generator=g, dtype=DT) * 0.1,
    }


def _outputs(features, cls_weight, codebook, word_weight, w2i_weight=None, normalise_histogram=False,
             word_valid=None):
    """The VWE heads written with matrices (the module uses 1x1 convolutions: VWE.head_outputs)."""
    assignment = word_assignment(features, codebook)
    out = {"p_img": hspp(features) @ cls_weight.reshape(C, -1).t(),
           "y_word": word_labels(assignment, word_valid),
           "p_word": features.mean(dim=(-2, -1)) @ word_weight.reshape(K, -1).t()}
    if w2i_weight is not None:
        out["p_w2i"] = word_histogram(assignment, normalise_histogram) @ w2i_weight.reshape(C, -1).t()
    return out


def _losses(t, labels, strategy="ijcai", weights=None, **options):
    return vwe_losses(_outputs(**t, **options), labels, strategy, codebook=t["codebook"], weights=weights)


def test_vwe_losses_match_explicit_loops():
    t = _heads()
    y = _labels()
    losses = _losses(t, y)
    assert set(losses) == {"img", "w2i", "word"}
    feat = t["features"]
    # L1: HSPP features -> classifier
    z = _hspp_loop(feat)
    p_img = torch.tensor(
        [[sum(t["cls_weight"][c, d].item() * z[b, d].item() for d in range(D)) for c in range(C)] for b in range(B)],
        dtype=DT,
    )
    assert losses["img"].item() == pytest.approx(_mlsm_loop(p_img, y), abs=1e-10)
    # L2: soft histogram (a SUM over 16 pixels) -> W_a
    s = _assignment_loop(feat, t["codebook"])
    hist = [[sum(s[b, k].flatten().tolist()) for k in range(K)] for b in range(B)]
    p_w2i = torch.tensor(
        [[sum(t["w2i_weight"][c, k].item() * hist[b][k] for k in range(K)) for c in range(C)] for b in range(B)],
        dtype=DT,
    )
    assert losses["w2i"].item() == pytest.approx(_mlsm_loop(p_w2i, y), abs=1e-10)
    # L3: GAP features -> W_b against the hard word labels
    y_word = torch.zeros(B, K)
    for b in range(B):
        for i in range(4):
            for j in range(4):
                y_word[b, int(s[b, :, i, j].argmax())] = 1.0
    gap = feat.mean(dim=(-2, -1))
    p_word = torch.tensor(
        [[sum(t["word_weight"][k, d, 0, 0].item() * gap[b, d].item() for d in range(D)) for k in range(K)]
         for b in range(B)],
        dtype=DT,
    )
    assert losses["word"].item() == pytest.approx(_mlsm_loop(p_word, y_word), abs=1e-10)


def test_strategies_weights_and_options():
    t = _heads(22)
    y = _labels()
    base = _losses(t, y)
    learned = _losses(t, y, strategy="learned_v2")
    assert set(learned) == {"img", "w2i", "word", "decov"}
    assert learned["decov"].item() == pytest.approx(decov_loss(t["codebook"]).item(), rel=1e-12)
    for key in base:
        assert learned[key].item() == pytest.approx(base[key].item(), rel=1e-12)
    mbk = _losses({**t, "w2i_weight": None}, y, strategy="memory_bank")
    assert set(mbk) == {"img", "word"}  # L = L1 + L3 (§7b)
    assert mbk["img"].item() == pytest.approx(base["img"].item(), rel=1e-12)
    # weights are applied, and the zero-weight entropy appears only when switched on
    w = _losses(t, y, strategy="learned_v2", weights={"img": 0.5, "decov": 2.0, "ent": 0.25})
    assert w["img"].item() == pytest.approx(0.5 * base["img"].item(), rel=1e-12)
    assert w["decov"].item() == pytest.approx(2.0 * learned["decov"].item(), rel=1e-12)
    p_word = _outputs(**t)["p_word"]
    assert w["ent"].item() == pytest.approx(0.25 * word_entropy(p_word).item(), rel=1e-12)
    assert LOSS_WEIGHTS["ent"] == 0.0 and "ent" not in learned
    # histogram as a mean: p_w2i divided by h*w = 16, so L2 changes (P4)
    mean_hist = _losses(t, y, normalise_histogram=True)
    p_w2i = _outputs(**t)["p_w2i"] / 16
    assert mean_hist["w2i"].item() == pytest.approx(F.multilabel_soft_margin_loss(p_w2i, y).item(), rel=1e-12)
    assert mean_hist["w2i"].item() != pytest.approx(base["w2i"].item(), rel=1e-6)


def test_vwe_losses_errors():
    t = _heads(23)
    y = _labels()
    with pytest.raises(ValueError, match="unknown codebook strategy"):
        _losses(t, y, strategy="kmeans")
    with pytest.raises(ValueError, match="needs p_w2i"):
        _losses({**t, "w2i_weight": None}, y)
    with pytest.raises(ValueError, match="labels must be"):
        _losses(t, torch.zeros(B, C + 1, dtype=DT))
    with pytest.raises(ValueError, match="unknown loss weights"):
        _losses(t, y, weights={"cls": 1.0})
    with pytest.raises(ValueError, match="needs the codebook"):
        vwe_losses(_outputs(**t), y, "learned_v2")
    outputs = _outputs(**t)
    with pytest.raises(ValueError, match="p_word .* and y_word .* differ"):
        vwe_losses({**outputs, "y_word": outputs["y_word"][:, :-1]}, y)


def test_word_valid_flag_changes_only_word_loss():
    t = _heads(24)
    y = _labels()
    valid = torch.ones(B, 4, 4, dtype=torch.bool)
    valid[:, :, 2:] = False
    a, b = _losses(t, y), _losses(t, y, word_valid=valid)
    assert a["img"].item() == b["img"].item() and a["w2i"].item() == b["w2i"].item()
    s = word_assignment(t["features"], t["codebook"])
    expected = F.multilabel_soft_margin_loss(_outputs(**t)["p_word"], word_labels(s[..., :2]))
    assert b["word"].item() == pytest.approx(expected.item(), rel=1e-12)


# --- §7a: decorrelation and entropy ------------------------------------------------------------------


def test_decov_hand_computed():
    # rows (2, 0) and (1, 5): centred (1, -1) and (-2, 2) -> Cov = [[2, -4], [-4, 8]]
    cb = torch.tensor([[2.0, 0.0], [1.0, 5.0]], dtype=DT)
    fro, diag = math.sqrt(4 + 16 + 16 + 64), math.sqrt(4 + 64)
    assert decov_loss(cb).item() == pytest.approx(0.5 * (fro - diag), abs=1e-12)
    assert decov_loss(cb, squared=True).item() == pytest.approx(16.0, abs=1e-12)  # 0.5 * (16 + 16)
    assert decov_loss(cb[:, :, None, None]).item() == pytest.approx(0.5 * (fro - diag), abs=1e-12)
    # centred rows pairwise orthogonal -> 0; adding a constant to a row changes nothing (centring)
    ortho = torch.tensor([[1.0, -1.0, 0.0, 0.0], [0.0, 0.0, 3.0, -3.0], [1.0, 1.0, -1.0, -1.0]], dtype=DT)
    assert decov_loss(ortho).item() == pytest.approx(0.0, abs=1e-12)
    assert decov_loss(ortho + torch.tensor([[5.0], [-2.0], [0.5]], dtype=DT)).item() == pytest.approx(0.0, abs=1e-12)


def test_word_entropy():
    assert word_entropy(torch.zeros(3, 7, dtype=DT)).item() == pytest.approx(math.log(7), abs=1e-12)
    logits = torch.tensor([[0.0, math.log(3.0)], [100.0, -100.0]], dtype=DT)  # probs (1/4, 3/4), ~(1, 0)
    h0 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert word_entropy(logits).item() == pytest.approx(h0 / 2, abs=1e-12)


# --- §10 item 4: gradient routing --------------------------------------------------------------------


def _stub_backbone(seed: int = 30) -> list[nn.Module]:
    torch.manual_seed(seed)
    stages = [
        nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()),
        nn.Conv2d(6, D, 1),
    ]
    return [s.double() for s in stages]


def _routing(strategy: str):
    stages = _stub_backbone()
    x = torch.randn(B, 3, 16, 16, generator=_gen(31), dtype=DT)
    # the module's stage-2 cut (frozen stem..layer2, vwe.md §2, P3): none for memory_bank
    f2 = stages[1](stages[0](x))
    if strategy != "memory_bank":
        f2 = f2.detach()
    feat = stages[3](stages[2](f2))
    assert feat.shape == (B, D, 4, 4)
    t = _heads(32)
    heads = {k: v.requires_grad_() for k, v in t.items() if k != "features"}
    if strategy == "memory_bank":
        heads["codebook"].requires_grad_(False)  # a buffer
        heads["w2i_weight"] = None
    losses = vwe_losses(_outputs(feat, **heads), _labels(), strategy, codebook=heads["codebook"])
    early = [p for s in stages[:2] for p in s.parameters()]
    late = [p for s in stages[2:] for p in s.parameters()]
    return losses, feat, heads, early, late


@pytest.mark.parametrize("strategy", ["ijcai", "learned_v2"])
def test_gradient_routing(strategy):
    losses, feat, heads, early, late = _routing(strategy)
    cb, wa, wb, wc = heads["codebook"], heads["w2i_weight"], heads["word_weight"], heads["cls_weight"]
    # L1 -> classifier and features (layer3/4), never the codebook or the word heads
    g_feat, g_cb, g_wa, g_wb, g_wc = _grads(losses["img"], [feat, cb, wa, wb, wc])
    assert not _is_zero(g_feat) and not _is_zero(g_wc)
    assert _is_zero(g_cb) and _is_zero(g_wa) and _is_zero(g_wb)
    # L2 -> codebook and W_a only: the features are detached before the cosine
    g_feat, g_cb, g_wa, g_wb, g_wc, *g_late = _grads(losses["w2i"], [feat, cb, wa, wb, wc, *late])
    assert _is_zero(g_feat) and all(_is_zero(g) for g in g_late)
    assert not _is_zero(g_cb) and not _is_zero(g_wa)
    assert _is_zero(g_wb) and _is_zero(g_wc)
    # L3 -> W_b and features; the hard targets carry no gradient to the codebook
    g_feat, g_cb, g_wa, g_wb, g_wc = _grads(losses["word"], [feat, cb, wa, wb, wc])
    assert not _is_zero(g_feat) and not _is_zero(g_wb)
    assert _is_zero(g_cb) and _is_zero(g_wa) and _is_zero(g_wc)
    # the total: stage1/stage2 get nothing (detach after layer2), stage3/stage4 do
    total = sum(losses.values())
    assert all(_is_zero(g) for g in _grads(total, early))
    assert all(not _is_zero(g) for g in _grads(total, [late[0], late[-1]]))
    if strategy == "learned_v2":
        g_feat, g_cb, g_wa = _grads(losses["decov"], [feat, cb, wa])
        assert _is_zero(g_feat) and _is_zero(g_wa) and not _is_zero(g_cb)


def test_gradient_routing_memory_bank():
    losses, feat, heads, early, late = _routing("memory_bank")
    total = sum(losses.values())
    assert all(not _is_zero(g) for g in _grads(total, [early[0], early[-1], late[0]]))  # no stage-2 detach
    (g_wb,) = _grads(losses["word"], [heads["word_weight"]])
    assert not _is_zero(g_wb)
    assert not heads["codebook"].requires_grad


def test_detach_inside_word_assignment_and_labels():
    feat = torch.randn(B, D, 4, 4, generator=_gen(33), dtype=DT, requires_grad=True)
    cb = torch.randn(K, D, generator=_gen(34), dtype=DT)
    assert not word_assignment(feat, cb).requires_grad  # features detached, codebook constant
    s = word_assignment(feat, cb.requires_grad_())
    assert s.requires_grad and not word_labels(s).requires_grad
    assert not _outputs(feat, torch.randn(C, D, dtype=DT), cb, torch.randn(K, D, dtype=DT))["y_word"].requires_grad


def _clusters():
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.0]], dtype=DT)  # word 2 unused
    pix = [
        [3.0, 0.2, 0.1], [0.5, -0.1, 0.0], [2.0, 0.0, -0.3],  # cluster 0 (raw magnitudes differ)
        [0.1, 4.0, 0.2], [-0.2, 1.0, 0.0], [0.0, 2.0, 0.5], [0.3, 0.5, -0.1], [0.1, 3.0, 0.0],  # cluster 1
    ]
    feat = torch.tensor(pix, dtype=DT).reshape(2, 2, 2, 3).permute(0, 3, 1, 2)  # (B=2, D=3, 2, 2)
    return centres, feat, torch.tensor(pix[:3], dtype=DT), torch.tensor(pix[3:], dtype=DT)


def test_memory_bank_rho_one_returns_cluster_means():
    centres, feat, c0, c1 = _clusters()
    assert hard_word_assignment(feat, centres).tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    exact = memory_bank_update(centres, feat, rho=1.0, eps=0.0)
    torch.testing.assert_close(exact[0], c0.mean(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(exact[1], c1.mean(0), rtol=0, atol=1e-12)
    assert exact[2].tolist() == [0.0, 0.0, 0.0]  # unused word: M = 0
    # official count + 1e-4
    official = memory_bank_update(centres, feat, rho=1.0)
    torch.testing.assert_close(official[0], c0.sum(0) / (3 + MEMORY_BANK_EPS), rtol=0, atol=1e-12)
    torch.testing.assert_close(official[1], c1.sum(0) / (5 + MEMORY_BANK_EPS), rtol=0, atol=1e-12)
    torch.testing.assert_close(official[:2], exact[:2], rtol=1e-4, atol=0)


def test_memory_bank_partial_step_and_unused_decay():
    centres, feat, c0, c1 = _clusters()
    rho = 0.25
    new = memory_bank_update(centres, feat, rho=rho)
    torch.testing.assert_close(new[2], (1 - rho) * centres[2], rtol=0, atol=1e-12)  # shrinks by (1 - rho)
    torch.testing.assert_close(new[0], rho * c0.sum(0) / (3 + MEMORY_BANK_EPS) + (1 - rho) * centres[0])
    assert centres[2].tolist() == [-1.0, -1.0, 0.0]  # input untouched


def test_memory_bank_update_matches_loop_on_random_data():
    feat = torch.randn(2, 4, 3, 3, generator=_gen(40), dtype=DT)
    cb = torch.randn(6, 4, generator=_gen(41), dtype=DT)
    rho = 0.3
    pixels = [feat[b, :, i, j] for b in range(2) for i in range(3) for j in range(3)]
    expected = cb.clone()
    for k in range(6):
        members = [p for p in pixels if max(range(6), key=lambda kk: _cos(cb[kk].tolist(), p.tolist())) == k]
        mean = sum(members) / (len(members) + MEMORY_BANK_EPS) if members else torch.zeros(4, dtype=DT)
        expected[k] = rho * mean + (1 - rho) * cb[k]
    torch.testing.assert_close(memory_bank_update(cb, feat, rho=rho), expected, rtol=0, atol=1e-12)


def test_memory_bank_init_and_step():
    feat = torch.randn(2, 4, 3, 3, generator=_gen(42), dtype=DT)
    pixels = {tuple(feat[b, :, i, j].tolist()) for b in range(2) for i in range(3) for j in range(3)}
    cb0 = memory_bank_init(feat, 40, generator=_gen(43))
    assert cb0.shape == (40, 4) and all(tuple(row.tolist()) in pixels for row in cb0)
    assert len({tuple(r.tolist()) for r in cb0}) > 1
    kaiming = torch.randn(40, 4, generator=_gen(44), dtype=DT)
    torch.testing.assert_close(memory_bank_step(kaiming, feat, 0, generator=_gen(43)), cb0)  # step 0 overwrites
    torch.testing.assert_close(memory_bank_step(kaiming, feat, 5, rho=0.1), memory_bank_update(kaiming, feat, 0.1))
    with pytest.raises(ValueError, match="rho"):
        memory_bank_update(kaiming, feat, rho=1.5)


# --- §10 item 5 and §3: CAM inference ----------------------------------------------------------------


def test_fuse_flip_pair_max_and_sum():
    a0 = torch.tensor([[[1.0, 5.0, -2.0]]], dtype=DT)
    a1 = torch.tensor([[[4.0, 0.5, 3.0]]], dtype=DT)  # flip back -> (3, 0.5, 4)
    pair = torch.stack([a0, a1])
    assert fuse_flip_pair(F.relu(pair), "max").tolist() == [[[3.0, 5.0, 4.0]]]
    assert fuse_flip_pair(F.relu(pair), "sum").tolist() == [[[4.0, 5.5, 4.0]]]  # relu per pass first
    with pytest.raises(ValueError, match="flip fusion"):
        fuse_flip_pair(pair, "mean")


def multiscale_vwe_cams(cam_fn, image, keys, scales, flip_fusion="max"):  # noqa: ANN001, ANN201
    """VWE's inference (vwe.md §3) as VWE.infer_cams calls it: ReLU per pass, flip max, sizes straight to H x W."""
    return multiscale_cams(lambda x: F.relu(cam_fn(x)), image, keys, scales, flip_fusion=flip_fusion, high_res="full")


def _ramp_cam_fn(batch: torch.Tensor) -> torch.Tensor:
    """Asymmetric stub: channel c = relu(image channel c) * (column index + 1); not flip-equivariant."""
    ramp = torch.arange(1, batch.shape[-1] + 1, dtype=batch.dtype)
    return batch[:, :3] * ramp


def test_multiscale_single_scale_flip_is_max_and_labels_only():
    h, w = 6, 7
    image = torch.randn(3, h, w, generator=_gen(52), dtype=torch.float32)
    keys = torch.tensor([0, 2])
    rec = multiscale_vwe_cams(_ramp_cam_fn, image, keys, scales=(1.0,))
    assert rec["keys"].tolist() == [0, 2]
    assert rec["high_res"].shape == (2, h, w) and rec["cam"].shape == (2, 2, 2)
    # independent expectation: A0 = relu(x) * (j+1), flip(A1)[j] = relu(x[j]) * (w - j)
    expected = torch.zeros(2, h, w)
    for n, c in enumerate(keys.tolist()):
        for i in range(h):
            for j in range(w):
                v = max(image[c, i, j].item(), 0.0)
                expected[n, i, j] = max(v * (j + 1), v * (w - j))
    expected /= expected.flatten(1).amax(1)[:, None, None] + CAM_NORM_EPS
    torch.testing.assert_close(rec["high_res"], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rec["high_res"].flatten(1).amax(1), torch.ones(2), rtol=0, atol=1e-4)
    summed = multiscale_vwe_cams(_ramp_cam_fn, image, keys, scales=(1.0,), flip_fusion="sum")
    assert not torch.allclose(summed["high_res"], rec["high_res"], atol=1e-3)


def test_multiscale_sums_scales_then_normalises():
    h, w = 10, 14
    keys = torch.tensor([1, 3])

    def pattern_fn(batch: torch.Tensor) -> torch.Tensor:  # ignores the content: depends on size only
        n, _, hs, ws = batch.shape
        i = torch.arange(hs, dtype=batch.dtype)[:, None]
        j = torch.arange(ws, dtype=batch.dtype)[None, :]
        maps = torch.stack([(c + 1) * (j + 1) ** 2 + i - 2.0 for c in range(4)])  # negative corners too
        return maps.expand(n, 4, hs, ws)

    rec = multiscale_vwe_cams(pattern_fn, torch.zeros(1, 3, h, w), keys, scales=(1.0, 0.5))
    hi, lo = torch.zeros(2, h, w), torch.zeros(2, 3, 4)
    for hs, ws in [(h, w), (5, 7)]:
        a = pattern_fn(torch.zeros(2, 3, hs, ws))[0, keys].clamp_min(0)
        fused = torch.maximum(a, a.flip(-1))[None]
        hi += F.interpolate(fused, (h, w), mode="bilinear", align_corners=False)[0]
        lo += F.interpolate(fused, (3, 4), mode="bilinear", align_corners=False)[0]
    hi /= hi.flatten(1).amax(1)[:, None, None] + CAM_NORM_EPS
    lo /= lo.flatten(1).amax(1)[:, None, None] + CAM_NORM_EPS
    torch.testing.assert_close(rec["high_res"], hi, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec["cam"], lo, rtol=1e-5, atol=1e-6)
    assert rec["high_res"].dtype == torch.float32


def test_multiscale_no_labels():
    rec = multiscale_vwe_cams(_ramp_cam_fn, torch.zeros(3, 8, 8), torch.zeros(0, dtype=torch.long), scales=(1.0,))
    assert rec["high_res"].shape == (0, 8, 8) and rec["cam"].shape == (0, 2, 2)
