"""SLAMs-R stage A / stage B losses and inference (slams.md §2-§4, §8; tests §10 items 1-7 at a tiny size).

Every check compares against numbers worked out independently: hand-computed tiny tensors, explicit
Python loops re-implementing the equations, or invariants (stub encoders with a known optimum).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_wsss.cams import multiscale_cams
from lit_wsss.losses.slams import (
    CAM_NORM_EPS,
    SIM_CLAMP_EPS,
    SLAMS_CAM_SCALES,
    STAGE_B_KEYS,
    W_AR,
    activation_map_losses,
    activation_masks,
    activation_regularisation_loss,
    cam_from_logits,
    category_background_loss,
    category_foreground_loss,
    category_pairs,
    complementation_loss,
    downscale_valid,
    encoder_losses,
    encoder_similarity,
    labels_with_background,
    pair_images,
    pair_similarity,
    se_image,
    semantic_embeddings,
    view_consistency_loss,
)

DT = torch.float64
BIG = 800.0  # sigmoid(+-800) is exactly 1 / 0 in float64


def _rand(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy(rng.normal(size=shape) * scale)


def _grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _cos(a: list[float], b: list[float]) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    return 0.0 if na == 0 or nb == 0 else sum(x * y for x, y in zip(a, b)) / (na * nb)


# --- Stage A (§2) -----------------------------------------------------------------------------------


def test_semantic_embeddings_explicit_loop():
    rng = np.random.default_rng(0)
    b, d, h, w, k, e = 2, 3, 2, 3, 3, 2
    feats = _rand(rng, b, d, h, w)
    weight = _rand(rng, k * e, d)
    out = semantic_embeddings(feats, weight, k)
    assert out.shape == (b, k, e)
    for bi in range(b):
        for ki in range(k):
            for i in range(e):
                total = 0.0
                for y in range(h):
                    for x in range(w):
                        total += max(
                            0.0, sum(float(weight[ki * e + i, c] * feats[bi, c, y, x]) for c in range(d))
                        )
                assert out[bi, ki, i].item() == pytest.approx(total, abs=1e-12)
    torch.testing.assert_close(semantic_embeddings(feats, weight[:, :, None, None], k), out, rtol=0, atol=0)
    torch.testing.assert_close(semantic_embeddings(feats, weight, k, reduction="mean"), out / (h * w))


def test_semantic_embeddings_errors():
    feats = torch.zeros(1, 3, 2, 2)
    with pytest.raises(ValueError, match="K \\* E"):
        semantic_embeddings(feats, torch.zeros(7, 3), 2)
    with pytest.raises(ValueError, match="channels"):
        semantic_embeddings(feats, torch.zeros(4, 5), 2)
    with pytest.raises(ValueError, match="reduction"):
        semantic_embeddings(feats, torch.zeros(4, 3), 2, reduction="max")


def test_encoder_similarity_and_bce_hand_computed():
    # K = 2 (bg + one class), E = 2, the class absent; s = relu(W) = [[1, 0], [0, 2]].
    weight = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=DT)
    emb = torch.tensor([[[3.0, 4.0], [1.0, 1.0]]], dtype=DT)
    labels = torch.tensor([[0]])
    sim = encoder_similarity(emb, weight, labels)
    torch.testing.assert_close(sim, torch.tensor([[0.6, 1 / math.sqrt(2)]], dtype=DT))
    loss = encoder_losses(emb, weight, labels)
    assert set(loss) == {"se"}
    expected = -(math.log(0.6) + math.log(1 - 1 / math.sqrt(2))) / 2
    assert loss["se"].item() == pytest.approx(expected, rel=1e-12)
    assert encoder_losses(emb, weight, labels, w_se=3.0)["se"].item() == pytest.approx(
        3 * expected, rel=1e-12
    )
    # Clamp: a perfect match gives 1 - 1e-4, an opposite one -1 + 1e-4 (signed inputs, not ReLU'd).
    same = torch.tensor([[[2.0, 0.0], [0.0, 5.0]]], dtype=DT)
    torch.testing.assert_close(
        encoder_similarity(same, weight, labels), torch.full((1, 2), 1 - SIM_CLAMP_EPS, dtype=DT)
    )
    opposite = torch.tensor([[[-2.0, 0.0], [0.0, -5.0]]], dtype=DT)
    torch.testing.assert_close(
        encoder_similarity(opposite, weight, labels), torch.full((1, 2), -1 + SIM_CLAMP_EPS, dtype=DT)
    )


def test_encoder_reconstruction_option():
    rng = np.random.default_rng(1)
    emb, weight = _rand(rng, 2, 3, 4).abs(), _rand(rng, 3, 4)
    labels = torch.tensor([[1, 0], [0, 1]])
    image, recon = _rand(rng, 2, 3, 4, 4), _rand(rng, 2, 3, 4, 4)
    out = encoder_losses(emb, weight, labels, reconstruction=recon, image=image, w_rec=0.5)
    assert set(out) == {"se", "rec"}
    assert out["rec"].item() == pytest.approx(0.5 * float(((recon - image) ** 2).mean()), rel=1e-12)
    with pytest.raises(ValueError, match="reconstruction"):
        encoder_losses(emb, weight, labels, reconstruction=recon)


def test_encoder_detach_trick_gradients():
    """§10 item 6 (stage A): dL_SE/ds_k = 0 for categories absent from the batch; per image otherwise (P4)."""
    rng = np.random.default_rng(2)
    b, k, e = 2, 4, 3
    emb = _rand(rng, b, k, e).abs().requires_grad_(True)
    weight = _rand(rng, k, e).abs().requires_grad_(True)  # positive: relu is the identity, gradient passes
    labels = torch.tensor([[1, 0, 0], [0, 1, 0]])  # img0 {bg, 1}, img1 {bg, 2}; category 3 absent
    loss = encoder_losses(emb, weight, labels)["se"]
    g_emb, g_w = _grads(loss, [emb, weight])
    assert torch.all(g_w[3] == 0)
    assert torch.all(g_emb[:, 3].abs().sum(-1) > 0)  # absent categories' embeddings are still pushed down
    # Category 1 is present only in image 0: its semantics get exactly the gradient of that one BCE entry.
    w1 = weight.detach().clone().requires_grad_(True)
    e01 = emb.detach()[0, 1]
    cos = (e01 * w1[1]).sum() / (e01.norm() * w1[1].norm())
    single = -torch.log(cos) / (b * k)
    (g_ref,) = torch.autograd.grad(single, [w1])
    torch.testing.assert_close(g_w[1], g_ref[1], rtol=1e-10, atol=1e-14)
    # Background is present in both images: both contribute, so its gradient is not that of one image.
    assert g_w[0].abs().sum() > 0


def test_labels_with_background_errors():
    torch.testing.assert_close(
        labels_with_background(torch.tensor([[0.0, 1.0]])), torch.tensor([[True, False, True]])
    )
    with pytest.raises(ValueError, match="multi-hot"):
        labels_with_background(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="\\(B, C\\)"):
        labels_with_background(torch.zeros(3))
    with pytest.raises(ValueError, match="background is added"):
        encoder_similarity(torch.zeros(1, 3, 2), torch.zeros(3, 2), torch.zeros(1, 3))


# --- §10 item 2: pair bookkeeping ---------------------------------------------------------------------


def test_category_pairs_cat_dog():
    labels = torch.zeros(1, 20)
    labels[0, 7] = labels[0, 11] = 1  # VOC cat, dog (0-based foreground indices) -> categories 8, 12
    b_idx, k_idx, others = category_pairs(labels)
    assert b_idx.tolist() == [0, 0, 0] and k_idx.tolist() == [0, 8, 12]  # (bg, cat, dog), N = 3
    assert others.shape == (3, 21)
    assert others[1].nonzero().flatten().tolist() == [0, 12]  # O(cat) = {bg, dog}
    assert others[0].nonzero().flatten().tolist() == [8, 12]
    assert others[2].nonzero().flatten().tolist() == [0, 8]


def test_category_pairs_explicit_loop():
    rng = np.random.default_rng(3)
    labels = torch.from_numpy(rng.integers(0, 2, size=(4, 5)))
    labels[2] = 0  # an image without labels: its background pair has no "others"
    b_idx, k_idx, others = category_pairs(labels)
    expected = [(b, k) for b in range(4) for k in range(6) if k == 0 or labels[b, k - 1] == 1]
    assert list(zip(b_idx.tolist(), k_idx.tolist())) == expected
    assert len(expected) == sum(1 + int(labels[b].sum()) for b in range(4))
    for n, (b, k) in enumerate(expected):
        present = {j for j in range(6) if j == 0 or labels[b, j - 1] == 1}
        assert set(others[n].nonzero().flatten().tolist()) == present - {k}
    assert not others[[n for n, (b, _) in enumerate(expected) if b == 2]].any()


# --- §10 item 1: masking identity ---------------------------------------------------------------------


def test_downscale_valid_floor_hand_computed():
    valid = torch.zeros(2, 10, 10, dtype=torch.bool)
    valid[0, 3:10, 0:7] = True  # rows [3, 10) -> [floor(1.2), floor(4)) = [1, 4); cols [0, 7) -> [0, 2)
    valid[1, 0:6, 6:10] = (
        True  # rows [0, 6) -> [0, floor(2.4)) = [0, 2); cols [6, 10) -> [floor(2.4), 4) = [2, 4)
    )
    out = downscale_valid(valid, (4, 4))
    expected = torch.zeros(2, 4, 4)
    expected[0, 1:4, 0:2] = 1
    expected[1, 0:2, 2:4] = 1
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(
        downscale_valid(torch.ones(1, 10, 10), (4, 4)), torch.ones(1, 4, 4), rtol=0, atol=0
    )
    torch.testing.assert_close(
        downscale_valid(torch.zeros(1, 5, 5, dtype=torch.bool), (3, 3)), torch.zeros(1, 3, 3)
    )
    holey = torch.ones(1, 5, 5, dtype=torch.bool)
    holey[0, 2, 2] = False
    with pytest.raises(ValueError, match="rectangle"):
        downscale_valid(holey, (3, 3))


def test_activation_masks_resize_before_sigmoid_and_valid():
    z = torch.tensor([[[[0.0, 2.0], [4.0, -2.0]]]], dtype=DT)  # (1, 1, 2, 2) -> 3 x 3, align_corners=True
    m = activation_masks(z, (3, 3))
    assert m[0, 0, 0, 0].item() == pytest.approx(0.5)  # corners are kept exactly
    assert m[0, 0, 0, 2].item() == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert m[0, 0, 1, 1].item() == pytest.approx(
        1 / (1 + math.exp(-1.0))
    )  # sigmoid(mean 1), not mean of sigmoids
    assert m[0, 0, 0, 1].item() == pytest.approx(1 / (1 + math.exp(-1.0)))
    valid = torch.tensor([[[1.0, 1.0, 0.0]] * 3])
    mv = activation_masks(z, (3, 3), valid)
    torch.testing.assert_close(mv, m * valid[:, None].to(DT))
    x = torch.tensor([[[[0.0, 2.0], [4.0, 6.0]]]], dtype=DT)
    xs = se_image(x, (3, 3))
    assert xs[0, 0, 1, 1].item() == pytest.approx(3.0) and xs[0, 0, 2, 2].item() == 6.0


def test_masking_identity():
    """§10 item 1: x_fg + x_bg == x_s for any M in [0, 1]; with M = valid mask only, x_fg is the crop."""
    rng = np.random.default_rng(4)
    x_s = _rand(rng, 2, 3, 6, 6)
    masks = torch.from_numpy(rng.uniform(size=(2, 4, 6, 6)))
    labels = torch.tensor([[1, 0, 1], [0, 0, 0]])
    b_idx, k_idx, _ = category_pairs(labels)
    x_fg, x_bg = pair_images(x_s, masks, b_idx, k_idx)
    assert x_fg.shape == (4, 3, 6, 6)
    torch.testing.assert_close(x_fg + x_bg, x_s[b_idx], rtol=0, atol=1e-14)
    for n, (b, k) in enumerate(zip(b_idx.tolist(), k_idx.tolist())):
        torch.testing.assert_close(x_fg[n], x_s[b] * masks[b, k], rtol=0, atol=0)
    # M = the valid mask only (all logits +BIG): x_fg is the un-padded crop, x_bg the padding.
    valid_full = torch.zeros(2, 12, 12, dtype=torch.bool)
    valid_full[:, 0:8, 2:12] = True
    valid = downscale_valid(valid_full, (6, 6)).to(DT)
    m = activation_masks(torch.full((2, 4, 6, 6), BIG, dtype=DT), (6, 6), valid)
    torch.testing.assert_close(m, valid[:, None].expand(2, 4, 6, 6), rtol=0, atol=0)
    x_fg, x_bg = pair_images(x_s, m, b_idx, k_idx)
    torch.testing.assert_close(x_fg, x_s[b_idx] * valid[b_idx, None], rtol=0, atol=0)
    torch.testing.assert_close(x_bg, x_s[b_idx] * (1 - valid[b_idx, None]), rtol=0, atol=0)


# --- §10 item 3: cf / cb values and ranges ------------------------------------------------------------


def test_cf_cb_explicit_loop():
    rng = np.random.default_rng(5)
    labels = torch.tensor([[1, 1, 0], [0, 0, 1], [0, 0, 0]])
    _, k_idx, others = category_pairs(labels)
    n = len(k_idx)
    sim_fg = torch.from_numpy(rng.uniform(-1, 1, size=(n, 4)))
    sim_bg = torch.from_numpy(rng.uniform(-1, 1, size=(n, 4)))
    own_fg = [sim_fg[i, k_idx[i]].item() for i in range(n)]
    oth_fg = [sim_fg[i, j].item() for i in range(n) for j in range(4) if others[i, j]]
    own_bg = [sim_bg[i, k_idx[i]].item() for i in range(n)]
    oth_bg = [sim_bg[i, j].item() for i in range(n) for j in range(4) if others[i, j]]
    assert len(oth_fg) == 3 * 2 + 2 * 1  # image 0: 3 pairs x 2 others; image 1: 2 pairs x 1; image 2: none
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    cf = 0.5 * ((1 - mean(own_fg)) + (1 + mean(oth_fg)))
    cb = 0.5 * ((1 - mean(oth_bg)) + (1 + mean(own_bg)))
    assert category_foreground_loss(sim_fg, k_idx, others).item() == pytest.approx(cf, abs=1e-12)
    assert category_background_loss(sim_bg, k_idx, others).item() == pytest.approx(cb, abs=1e-12)


def test_cf_cb_empty_others_is_zero_mean_not_nan():
    """§8 P9: a batch whose pairs have no "other" category averages the empty set to 0."""
    labels = torch.zeros(2, 3)
    _, k_idx, others = category_pairs(labels)
    sim = torch.tensor([[0.3, 0.9, 0.9, 0.9], [0.7, 0.9, 0.9, 0.9]], dtype=DT)
    assert category_foreground_loss(sim, k_idx, others).item() == pytest.approx(0.5 * ((1 - 0.5) + 1))
    assert category_background_loss(sim, k_idx, others).item() == pytest.approx(0.5 * (1 + (1 + 0.5)))


def test_pair_similarity_hand_computed_and_ranges():
    weight = torch.tensor([[1.0, 0.0], [-1.0, 2.0]], dtype=DT, requires_grad=True)  # s = [[1, 0], [0, 2]]
    emb = torch.tensor([[[3.0, 4.0], [0.0, 0.0]], [[-1.0, 0.0], [1.0, 1.0]]], dtype=DT)
    sim = pair_similarity(emb, weight)
    expected = torch.tensor([[0.6, 0.0], [-1.0, 1 / math.sqrt(2)]], dtype=DT)  # no clamp in stage B
    torch.testing.assert_close(sim, expected)
    rng = np.random.default_rng(6)
    labels = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 1]])
    _, k_idx, others = category_pairs(labels)
    n = len(k_idx)
    for _ in range(20):
        signed = pair_similarity(_rand(rng, n, 4, 5), _rand(rng, 4, 5))
        assert signed.min() >= -1 - 1e-12 and signed.max() <= 1 + 1e-12  # pull 1 - c, push 1 + c in [0, 2]
        cf = category_foreground_loss(signed, k_idx, others)
        cb = category_background_loss(signed, k_idx, others)
        assert 0 <= cf <= 2 and 0 <= cb <= 2
        relu_sim = pair_similarity(_rand(rng, n, 4, 5).relu(), _rand(rng, 4, 5))
        assert relu_sim.min() >= 0  # §8 P8: both sides ReLU'd -> c >= 0 -> push >= 1 -> L >= 0.5
        assert 0.5 <= category_foreground_loss(relu_sim, k_idx, others) <= 1.5
        assert 0.5 <= category_background_loss(relu_sim, k_idx, others) <= 1.5


# Shared stub for §10 items 3-5: four column regions R_0..R_3 of an 8 x 8 SE input.
S = 8
REGIONS = torch.zeros(4, S, S, dtype=DT)
for _k in range(4):
    REGIONS[_k, :, 2 * _k : 2 * _k + 2] = 1


def _stub_encoder(semantics: torch.Tensor):
    """Embedding of category j = s_j * (mean of channel 0 over R_j): s_j when R_j is visible, 0 when masked."""

    def encode(x: torch.Tensor) -> torch.Tensor:
        vis = torch.einsum("nhw,khw->nk", x[:, 0], REGIONS) / REGIONS.sum(dim=(1, 2))
        return vis[:, :, None] * semantics[None]

    return encode


def _partition_logits(assign: list[list[int]]) -> torch.Tensor:
    """(B, 4, S, S) logits +-BIG: image b gives region R_r to category assign[b][r]."""
    z = torch.full((len(assign), 4, S, S), -BIG, dtype=DT)
    for b, row in enumerate(assign):
        for r, k in enumerate(row):
            z[b, k][REGIONS[r] == 1] = BIG
    return z


def test_stub_encoder_perfect_partition_is_the_floor():
    """§10 item 3: perfect partition + stub SE -> pull 0, push 1, L_cf = L_cb = 0.5; L_con = 0 (item 5)."""
    rng = np.random.default_rng(7)
    weight = torch.from_numpy(rng.uniform(0.5, 1.5, size=(4, 3)))
    labels = torch.tensor([[1, 0, 1], [1, 0, 0]])  # img0 {bg, 1, 3}; img1 {bg, 1}
    # img0: R_0, R_2 background (category 2 absent), R_1 -> 1, R_3 -> 3; img1: only R_1 -> 1.
    z = _partition_logits([[0, 1, 0, 3], [0, 1, 0, 0]])
    image = torch.ones(2, 3, S, S, dtype=DT)
    out = activation_map_losses(z, image, labels, _stub_encoder(weight), weight, se_size=(S, S))
    assert set(out) == set(STAGE_B_KEYS)
    assert out["cf"].item() == pytest.approx(0.5, abs=1e-12)
    assert out["cb"].item() == pytest.approx(0.5, abs=1e-12)
    assert out["con"].item() == 0.0
    # img0: objects on 2 of 4 regions, bg on 2; img1: object on 1, bg on 3 -> mean(obj) = 3/24, 1 - mean(bg) = 3/8.
    assert out["ar"].item() == pytest.approx(W_AR * (3 / 24 + 3 / 8), abs=1e-12)
    # A soft (imperfect) partition leaves the floor.
    soft = activation_map_losses(z / 400, image, labels, _stub_encoder(weight), weight, se_size=(S, S))
    assert soft["cf"] > 0.5 + 1e-3 and soft["cb"] > 0.5 + 1e-3 and soft["con"] > 0


# --- §10 item 4: activation regularisation ------------------------------------------------------------


def test_activation_regularisation_hand_computed():
    m = torch.zeros(1, 3, 2, 2, dtype=DT)
    m[:, 0] = 1
    assert activation_regularisation_loss(m).item() == 0.0
    m[0, 2, 0, 0] = 0.4  # mean over 2 object channels x 4 px: 0.4 / 8
    m[0, 0, 1, 1] = 0.2  # bg mean 3.2 / 4 -> 1 - 0.8
    assert activation_regularisation_loss(m).item() == pytest.approx(0.05 + 0.2, abs=1e-12)
    rng = np.random.default_rng(8)
    for _ in range(10):
        r = torch.from_numpy(rng.uniform(size=(2, 3, 4, 4)))
        assert activation_regularisation_loss(r) > 0


def test_activation_regularisation_zero_iff_all_background_without_padding():
    labels = torch.tensor([[1, 1, 1]])
    z = torch.full((1, 4, S, S), -BIG, dtype=DT)
    z[:, 0] = BIG
    weight = torch.ones(4, 3, dtype=DT)
    image = torch.ones(1, 3, S, S, dtype=DT)
    out = activation_map_losses(z, image, labels, _stub_encoder(weight), weight, se_size=(S, S))
    assert out["ar"].item() == 0.0
    # With padding, M is zeroed there (background too), so L_ar cannot reach 0: padded fraction 1/4.
    valid = torch.ones(1, S, S, dtype=torch.bool)
    valid[:, :, 6:] = False
    out = activation_map_losses(z, image, labels, _stub_encoder(weight), weight, valid, se_size=(S, S))
    assert out["ar"].item() == pytest.approx(W_AR * 0.25, abs=1e-12)


# --- §10 item 5: complementation ----------------------------------------------------------------------


def _con_loop(masks: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> float:
    total, count = 0.0, 0
    b_n, k_n, s_h, s_w = masks.shape
    for b in range(b_n):
        present = [k for k in range(k_n) if k == 0 or labels[b, k - 1] == 1]
        for k in present:
            others = [j for j in present if j != k]
            if not others:
                continue
            for y in range(s_h):
                for x in range(s_w):
                    if valid[b, y, x]:
                        total += (
                            masks[b, k, y, x].item() + max(masks[b, j, y, x].item() for j in others) - 1
                        ) ** 2
                        count += 1
    return total / count if count else 0.0


def test_complementation_explicit_loop_and_padding():
    rng = np.random.default_rng(9)
    masks = torch.from_numpy(rng.uniform(size=(3, 4, 3, 4)))
    labels = torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    valid = torch.ones(3, 3, 4, dtype=torch.bool)
    valid[0, :, 3] = False
    valid[2, 0, :] = False
    loss = complementation_loss(masks, labels, valid)
    assert loss.item() == pytest.approx(_con_loop(masks, labels, valid), abs=1e-12)
    # Padded pixels do not count, whatever M holds there.
    changed = masks.clone()
    changed[~valid[:, None].expand_as(masks)] = 7.0
    assert complementation_loss(changed, labels, valid).item() == pytest.approx(loss.item(), abs=1e-12)
    assert complementation_loss(masks, labels).item() == pytest.approx(
        _con_loop(masks, labels, torch.ones(3, 3, 4, dtype=torch.bool)), abs=1e-12
    )
    # No image with a foreground label -> no term -> 0, not NaN.
    assert complementation_loss(masks, torch.zeros(3, 3)).item() == 0.0


def test_complementation_partition_overlap_hole():
    labels = torch.tensor([[1, 0]])  # present {bg, 1}; category 2 absent
    m = torch.zeros(1, 3, 1, 4, dtype=DT)
    m[0, 0, 0, :2] = 1
    m[0, 1, 0, 2:] = 1
    m[0, 2] = 1  # an absent category does not take part
    assert complementation_loss(m, labels).item() == 0.0
    overlap = m.clone()
    overlap[0, 1, 0, 0] = 1  # pixel 0: (1 + 1 - 1)^2 = 1 in both terms -> 2 / 8
    assert complementation_loss(overlap, labels).item() == pytest.approx(2 / 8)
    hole = m.clone()
    hole[0, 1, 0, 3] = 0.5  # pixel 3: (0.5 + 0 - 1)^2 in both terms -> 0.5 / 8
    assert complementation_loss(hole, labels).item() == pytest.approx(0.5 / 8)
    # The hole on a padded pixel does not count.
    valid = torch.tensor([[[True, True, True, False]]])
    assert complementation_loss(hole, labels, valid).item() == 0.0


def test_view_consistency_hand_computed():
    rng = np.random.default_rng(10)
    m = torch.from_numpy(rng.uniform(size=(2, 3, 2, 3)))
    assert view_consistency_loss(m, m.flip(-1)).item() == 0.0
    other = m.flip(-1).clone()
    other[0, 1, 0, 2] += 0.6  # flipped back: (0, 1, 0, 0), 1 of 36 entries
    assert view_consistency_loss(m, other).item() == pytest.approx(0.6 / 36)
    valid = torch.ones(2, 2, 3, dtype=torch.bool)
    valid[0, 0, 0] = False
    assert view_consistency_loss(m, other, valid).item() == 0.0


# --- §10 item 6: stage-B gradients --------------------------------------------------------------------


class _TinySE(nn.Module):
    def __init__(self, k: int = 4, e: int = 3) -> None:
        super().__init__()
        self.k = k
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.proj = nn.Parameter(torch.randn(k * e, 5))
        self.semantic = nn.Parameter(torch.randn(k, e))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return semantic_embeddings(F.relu(self.conv(x)), self.proj, self.k)


def test_stage_b_gradients_reach_logits_not_the_encoder():
    torch.manual_seed(0)
    se = _TinySE()
    se.eval()
    se.requires_grad_(False)
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    image = torch.randn(2, 3, 16, 16)
    valid = torch.zeros(2, 16, 16, dtype=torch.bool)
    valid[0, :12, :] = True
    valid[1] = True
    labels = torch.tensor([[1, 0, 1], [0, 1, 0]])
    weight = se.semantic.detach().clone().requires_grad_(True)
    out = activation_map_losses(z, image, labels, se, weight, valid, se_size=(8, 8))
    total = sum(out.values())
    g_z, g_w = _grads(total, [z, weight])
    assert g_z.abs().sum() > 0
    assert torch.all(g_w == 0)  # semantics are detached
    # The SE path alone (cf, cb) also reaches Z: the encoder is not run under no_grad (P3).
    only_se = activation_map_losses(z, image, labels, se, weight, valid, se_size=(8, 8), w_ar=0.0, w_con=0.0)
    (g_se,) = _grads(only_se["cf"] + only_se["cb"], [z])
    assert g_se.abs().sum() > 0
    total.backward()
    assert all(p.grad is None for p in se.parameters())


def test_stage_b_refuses_an_unfrozen_encoder():
    se = _TinySE()
    z, image, labels = torch.zeros(1, 4, 2, 2), torch.zeros(1, 3, 8, 8), torch.tensor([[1, 0, 0]])
    se.eval()
    with pytest.raises(ValueError, match="frozen"):
        activation_map_losses(z, image, labels, se, se.semantic, se_size=(8, 8))
    se.requires_grad_(False)
    se.train()
    with pytest.raises(ValueError, match="eval mode"):
        activation_map_losses(z, image, labels, se, se.semantic, se_size=(8, 8))


def test_stage_b_padding_logits_do_not_matter():
    """§8 P7: M is zeroed on padding before x_fg / x_bg, so logits there change no loss."""
    rng = np.random.default_rng(11)
    weight = torch.from_numpy(rng.uniform(0.5, 1.5, size=(4, 3)))
    labels = torch.tensor([[1, 0, 1]])
    z = _rand(rng, 1, 4, S, S)
    image = _rand(rng, 1, 3, S, S)
    valid = torch.ones(1, S, S, dtype=torch.bool)
    valid[:, 5:, :] = False
    a = activation_map_losses(z, image, labels, _stub_encoder(weight), weight, valid, se_size=(S, S))
    z2 = z.clone()
    z2[:, :, 5:, :] = _rand(rng, 1, 4, 3, S, scale=5.0)
    b = activation_map_losses(z2, image, labels, _stub_encoder(weight), weight, valid, se_size=(S, S))
    for key in STAGE_B_KEYS:
        assert a[key].item() == pytest.approx(b[key].item(), abs=1e-12)


def test_stage_b_options_and_weights():
    rng = np.random.default_rng(12)
    weight = torch.from_numpy(rng.uniform(0.5, 1.5, size=(4, 3)))
    labels = torch.tensor([[1, 0, 1]])
    z = _rand(rng, 1, 4, S, S)
    image = _rand(rng, 1, 3, S, S)
    enc = _stub_encoder(weight)
    base = activation_map_losses(z, image, labels, enc, weight, se_size=(S, S), w_ar=1.0)
    scaled = activation_map_losses(
        z, image, labels, enc, weight, se_size=(S, S), w_cf=2, w_cb=3, w_ar=4, w_con=5
    )
    for key, w in zip(STAGE_B_KEYS, (2, 3, 4, 5)):
        assert scaled[key].item() == pytest.approx(w * base[key].item(), rel=1e-12)
    # View consistency: the flipped view's own flipped logits give 0; its value is the hand formula.
    view = activation_map_losses(
        z, image, labels, enc, weight, se_size=(S, S), consistency="view", logits_flipped=z.flip(-1)
    )
    assert view["con"].item() == 0.0
    zf = _rand(rng, 1, 4, S, S)
    view = activation_map_losses(
        z, image, labels, enc, weight, se_size=(S, S), consistency="view", logits_flipped=zf
    )
    expected = (torch.sigmoid(z) - torch.sigmoid(zf).flip(-1)).abs().mean().item()
    assert view["con"].item() == pytest.approx(expected, rel=1e-12)
    assert "cls" not in base
    with pytest.raises(ValueError, match="logits_flipped"):
        activation_map_losses(z, image, labels, enc, weight, se_size=(S, S), consistency="view")
    with pytest.raises(ValueError, match="encoder must return"):
        activation_map_losses(z, image, labels, lambda x: enc(x)[:1], weight, se_size=(S, S))


# --- §10 item 7: inference ----------------------------------------------------------------------------


def _segnet(weight: torch.Tensor):
    def run(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.avg_pool2d(x, 4, ceil_mode=True), weight)

    return run


def _reference_cam(segnet, image, keys, scales, size):
    total = None
    h, w = image.shape[-2:]
    for s in scales:
        if s == 1.0:
            x = image[None]
        else:
            size_s = (int(round(h * s)), int(round(w * s)))
            x = F.interpolate(image[None], size=size_s, mode="bicubic", align_corners=False, antialias=True)
        a = F.relu(segnet(x))[0, 1:][keys]
        b = F.relu(segnet(x.flip(-1)))[0, 1:][keys].flip(-1)
        r = F.interpolate((a + b)[None], size=size, mode="bilinear", align_corners=False)[0]
        total = r if total is None else total + r
    return total / (total.flatten(1).amax(1)[:, None, None] + CAM_NORM_EPS)


def activation_map(segnet, image, keys, high_res="full"):  # noqa: ANN001, ANN201
    """SLAMs.infer_cams on a stub segnet: relu'd object logits through the shared multi-scale loop."""
    return multiscale_cams(lambda x: cam_from_logits(segnet(x)), image, keys, SLAMS_CAM_SCALES, high_res=high_res)


def test_inference_object_label_channels_and_max_one():
    torch.manual_seed(1)
    weight = torch.randn(4, 3, 1, 1)
    image = torch.randn(3, 16, 24)
    keys = torch.tensor([0, 2])
    rec = activation_map(_segnet(weight), image, keys)
    assert rec["keys"].tolist() == [0, 2]
    assert rec["cam"].shape == (2, 4, 6) and rec["high_res"].shape == (2, 16, 24)
    for m in (rec["cam"], rec["high_res"]):
        peak = m.flatten(1).amax(1)
        assert torch.all((peak > 1 - 1e-4) & (peak < 1)) and m.min() >= 0
    torch.testing.assert_close(
        rec["high_res"], _reference_cam(_segnet(weight), image, keys, SLAMS_CAM_SCALES, (16, 24))
    )
    torch.testing.assert_close(
        rec["cam"], _reference_cam(_segnet(weight), image, keys, SLAMS_CAM_SCALES, (4, 6))
    )
    # Background channel dropped: changing it changes nothing.
    w_bg = weight.clone()
    w_bg[0] = 50 * torch.randn(3, 1, 1)
    torch.testing.assert_close(activation_map(_segnet(w_bg), image, keys)["high_res"], rec["high_res"])
    # Raw ReLU'd logits, not sigmoid: scaling the logits leaves the normalised map unchanged (up to the eps).
    torch.testing.assert_close(
        activation_map(_segnet(3 * weight), image, keys)["high_res"], rec["high_res"], atol=1e-4, rtol=0
    )
    empty = activation_map(_segnet(weight), image, torch.tensor([], dtype=torch.long))
    assert empty["high_res"].shape == (0, 16, 24)
    with pytest.raises(ValueError, match="high_res"):
        activation_map(_segnet(weight), image, keys, high_res="other")


def test_cam_from_logits():
    z = torch.tensor([[[[5.0]], [[-1.0]], [[2.0]]]])
    torch.testing.assert_close(cam_from_logits(z), torch.tensor([[[[0.0]], [[2.0]]]]))
