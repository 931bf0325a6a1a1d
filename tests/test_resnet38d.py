"""ResNet-38 ("resnet38d", model A1) backbone of CPN (methods/cpn.md §2, §6, §10 C9, §12 item 8).

The backbone has ~105M parameters: it is built once per module and fed tiny inputs. Tests that change it
(freezing, an optimiser step) restore ``requires_grad`` and only rely on values they read themselves.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_wsss.backbones import BACKBONE_NAMES, FrozenStatsBatchNorm2d, build_backbone
from lit_wsss.errors import WeightsFileError

FROZEN_BY_CPN = ("conv1a.", "b2.", "b2_1.", "b2_2.")  # spec §6: conv1a, b2, b2_1, b2_2


@pytest.fixture(scope="module")
def bb():
    torch.manual_seed(0)
    model = build_backbone("resnet38d", pretrained=None)
    with torch.no_grad():  # non-default BN statistics/affine, so wrong wiring or a wrong load shows
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model


def bn_eval(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode BatchNorm written out by hand."""
    shape = (1, -1, 1, 1)
    scale = bn.weight.view(shape) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale + bn.bias.view(shape)


def test_registered_and_levels_shapes(bb):
    assert "resnet38d" in BACKBONE_NAMES
    assert bb.level_channels == (128, 256, 512, 1024, 4096)
    assert bb.level_strides == (2, 4, 8, 8, 8)
    assert bb.out_channels == 4096 and bb.weights_source == "random-init"
    bb.eval()
    with torch.no_grad():
        feats = bb(torch.randn(1, 3, 64, 64))
    # 64 / (2, 4, 8, 8, 8) = (32, 16, 8, 8, 8)
    assert [tuple(f.shape) for f in feats] == [
        (1, 128, 32, 32), (1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 8, 8), (1, 4096, 8, 8)]
    with torch.no_grad():  # odd size: every stride-2 conv has padding 1 -> ceil at each halving
        feats = bb(torch.randn(1, 3, 37, 50))
    assert [tuple(f.shape[2:]) for f in feats] == [(19, 25), (10, 13), (5, 7), (5, 7), (5, 7)]


def test_layer_hyperparameters(bb):
    convs = {n: m for n, m in bb.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(m.bias is None for m in convs.values())
    for name, m in convs.items():
        if m.kernel_size == (3, 3):
            assert m.padding == m.dilation, name
    assert convs["conv1a"].stride == (1, 1) and convs["conv1a"].in_channels == 3
    for block in ("b2", "b3", "b4"):
        assert convs[f"{block}.conv_branch2a"].stride == (2, 2)
        assert convs[f"{block}.conv_branch1"].stride == (2, 2)
    assert convs["b5.conv_branch2a"].dilation == (1, 1) and convs["b5.conv_branch2b1"].dilation == (2, 2)
    assert convs["b5_2.conv_branch2a"].dilation == (2, 2)
    assert convs["b6.conv_branch2b1"].dilation == (4, 4) and convs["b7.conv_branch2b1"].dilation == (4, 4)
    assert bb.b6.dropout_2b1.p == 0.3 and bb.b6.dropout_2b2.p == 0.3
    assert bb.b7.dropout_2b1.p == 0.5 and bb.b7.dropout_2b2.p == 0.5
    # shortcut convs exactly where the shape changes
    assert sorted(n.split(".")[0] for n in convs if n.endswith("conv_branch1")) == [
        "b2", "b3", "b4", "b5", "b6", "b7"]


def test_parameter_count_from_spec_layer_list(bb):
    def conv(cin, cout, k):
        return k * k * cin * cout  # no bias

    def bn(c):
        return 2 * c  # gamma, beta (running stats are buffers)

    def basic(cin, mid, cout, stride=1):  # bn, 3x3, bn, 3x3, 1x1 shortcut if the shape changes
        shortcut = conv(cin, cout, 1) if cin != cout or stride != 1 else 0
        return bn(cin) + conv(cin, mid, 3) + bn(mid) + conv(mid, cout, 3) + shortcut

    def bottleneck(cin, c1, c3, cout):  # bn, 1x1, bn, 3x3, bn, 1x1, 1x1 shortcut
        inner = bn(cin) + conv(cin, c1, 1) + bn(c1) + conv(c1, c3, 3) + bn(c3) + conv(c3, cout, 1)
        return inner + conv(cin, cout, 1)

    groups = [
        conv(3, 64, 3),                                                  # conv1a                  1,728
        basic(64, 128, 128, stride=2) + 2 * basic(128, 128, 128),        # b2, b2_1, b2_2        820,608
        basic(128, 256, 256, stride=2) + 2 * basic(256, 256, 256),       # b3 group            3,279,616
        basic(256, 512, 512, stride=2) + 5 * basic(512, 512, 512),       # b4, b4_1..b4_5     27,274,752
        basic(512, 512, 1024) + 2 * basic(1024, 512, 1024),              # b5 group           26,484,736
        bottleneck(1024, 512, 1024, 2048),                               # b6                  9,442,304
        bottleneck(2048, 1024, 2048, 4096),                              # b7                 37,758,976
        bn(4096),                                                        # bn7                     8,192
    ]
    assert sum(p.numel() for p in bb.parameters()) == sum(groups) == 105_070_912


def test_state_dict_names_follow_resnet38d_py(bb):
    keys = set(bb.state_dict())
    top = {k.split(".")[0] for k in keys}
    assert top == {"conv1a", "bn7", "b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4",
                   *(f"b4_{i}" for i in range(1, 6)), "b5", "b5_1", "b5_2", "b6", "b7"}
    for key in ("conv1a.weight", "b2.bn_branch2a.running_var", "b2.conv_branch1.weight",
                "b4_5.conv_branch2b1.weight", "b6.bn_branch2b2.weight", "b7.conv_branch2b2.weight",
                "bn7.num_batches_tracked"):
        assert key in keys, key
    assert "b2_1.conv_branch1.weight" not in keys  # identity shortcut


def test_blocks_match_the_spec_formula(bb):
    """ResBlock / bottleneck recomputed from spec §2 with functional ops and the modules' weights."""
    bb.eval()
    torch.manual_seed(1)

    def basic_ref(blk, x, stride, d1, d2):
        a = F.relu(bn_eval(blk.bn_branch2a, x))
        same = blk.conv_branch2a.in_channels == blk.conv_branch2b1.out_channels and stride == 1
        short = x if same else F.conv2d(a, blk.conv_branch1.weight, stride=stride)
        h = F.conv2d(a, blk.conv_branch2a.weight, stride=stride, padding=d1, dilation=d1)
        h = F.conv2d(F.relu(bn_eval(blk.bn_branch2b1, h)), blk.conv_branch2b1.weight, padding=d2, dilation=d2)
        return short + h

    def bottleneck_ref(blk, x, d):  # eval mode: dropout is the identity
        a = F.relu(bn_eval(blk.bn_branch2a, x))
        h = F.relu(bn_eval(blk.bn_branch2b1, F.conv2d(a, blk.conv_branch2a.weight)))
        h = F.relu(bn_eval(blk.bn_branch2b2, F.conv2d(h, blk.conv_branch2b1.weight, padding=d, dilation=d)))
        return F.conv2d(a, blk.conv_branch1.weight) + F.conv2d(h, blk.conv_branch2b2.weight)

    with torch.no_grad():
        for blk, cin, stride, d1, d2 in ((bb.b2, 64, 2, 1, 1), (bb.b2_1, 128, 1, 1, 1), (bb.b5, 512, 1, 1, 2),
                                         (bb.b5_1, 1024, 1, 2, 2)):
            x = torch.randn(1, cin, 9, 9)
            assert torch.allclose(blk(x), basic_ref(blk, x, stride, d1, d2), atol=1e-4, rtol=1e-4)
        x = torch.randn(1, 1024, 6, 6)
        assert torch.allclose(bb.b6(x), bottleneck_ref(bb.b6, x, 4), atol=1e-4, rtol=1e-4)


def test_taps_equal_bn_relu_of_block_outputs_via_hooks(bb):
    """conv4/conv5/conv6 are CPN's taps, recomputed from hooked block outputs; the trunk reuses them."""
    bb.eval()
    seen = {}
    hooks = [getattr(bb, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o))
             for n in ("b3_2", "b4_5", "b5_2", "b7")]
    hooks.append(bb.b5_1.register_forward_pre_hook(lambda m, i: seen.__setitem__("b5_1_in", i[0])))
    hooks.append(bb.b7.register_forward_pre_hook(lambda m, i: seen.__setitem__("b7_in", i[0])))
    torch.manual_seed(2)
    try:
        with torch.no_grad():
            feats = bb(torch.randn(1, 3, 48, 48))
            assert torch.equal(feats[1], seen["b3_2"])
            assert torch.allclose(feats[2], F.relu(bn_eval(bb.b5.bn_branch2a, seen["b4_5"])), atol=1e-5)
            assert torch.allclose(feats[3], F.relu(bn_eval(bb.b6.bn_branch2a, seen["b5_2"])), atol=1e-5)
            assert torch.allclose(feats[4], F.relu(bn_eval(bb.bn7, seen["b7"])), atol=1e-5)
            # the activation-reusing trunk equals the blocks' plain forward
            assert torch.allclose(seen["b5_1_in"], bb.b5(seen["b4_5"]), atol=1e-5)
            assert torch.allclose(seen["b7_in"], bb.b6(seen["b5_2"]), atol=1e-5)
    finally:
        for h in hooks:
            h.remove()


def test_freeze_levels_one_is_cpn_frozen_part(bb):
    try:
        bb.freeze_levels(1)
        for name, p in bb.named_parameters():
            assert p.requires_grad is not name.startswith(FROZEN_BY_CPN), name
        bb.requires_grad_(True)
        bb.freeze_levels(5)
        assert not any(p.requires_grad for p in bb.parameters())
        # every parameter belongs to exactly one level
        ids = [id(p) for level in bb.levels() for p in level.parameters()]
        assert len(ids) == len(set(ids)) == len(list(bb.parameters()))
    finally:
        bb.requires_grad_(True)


def test_dropout_active_in_train_mode_only(bb):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        bb.train()
        t1, t2 = bb(x), bb(x)
        bb.eval()
        e1, e2 = bb(x), bb(x)
    for a, b in zip(t1[:4], t2[:4], strict=True):  # before b6's dropout: deterministic (frozen BN)
        assert torch.equal(a, b)
    assert not torch.equal(t1[4], t2[4])
    assert all(torch.equal(a, b) for a, b in zip(e1, e2, strict=True))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(t1[:4], e1[:4], strict=True))


def test_frozen_bn_stats_unchanged_after_train_step(bb):
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    # 3 + 3 + 6 + 3 basic blocks x 2 BN, 2 bottlenecks x 3 BN, bn7
    assert len(bns) == 15 * 2 + 2 * 3 + 1
    assert all(isinstance(m, FrozenStatsBatchNorm2d) for m in bns)
    before = {k: v.clone() for k, v in bb.state_dict().items() if "running" in k or "num_batches" in k}
    frozen_before = {n: p.detach().clone() for n, p in bb.named_parameters() if n.startswith(FROZEN_BY_CPN)}
    bn7_weight = bb.bn7.weight.detach().clone()
    try:
        bb.freeze_levels(1)
        bb.train()
        opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(3)
        feats = bb(torch.randn(2, 3, 24, 24))
        sum(f.square().mean() for f in feats).backward()
        opt.step()
        assert bb.conv1a.weight.grad is None and bb.b2_2.bn_branch2a.weight.grad is None
        assert bb.b7.conv_branch2b2.weight.grad is not None
    finally:
        bb.zero_grad(set_to_none=True)
        bb.requires_grad_(True)
        bb.eval()
    after = bb.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    for n, v in frozen_before.items():
        assert torch.equal(dict(bb.named_parameters())[n], v), n
    assert not torch.equal(bb.bn7.weight, bn7_weight)  # gamma/beta are still trainable


def test_rejects_strides_and_imagenet():
    with pytest.raises(ValueError, match="output stride of 8"):
        build_backbone("resnet38d", pretrained=None, strides=(2, 2, 2, 2))
    with pytest.raises(FileNotFoundError) as info:
        build_backbone("resnet38d", pretrained="imagenet")
    msg = str(info.value)
    assert "ilsvrc-cls_rna-a1_cls1000_ep-0001" in msg and "pretrained=<path>" in msg


def test_load_official_names_from_file(bb, tmp_path):
    """A resnet38d.py-named file (num_batches_tracked absent as after MXNet conversion, plus the ImageNet
    classifier and CPN head keys) loads exactly; a DataParallel file missing a key fails naming it."""
    own = bb.state_dict()
    state = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    extra = {"fc8.weight": torch.randn(21, 4096, 1, 1), "f8_3.weight": torch.randn(64, 512, 1, 1),
             "f8_4.weight": torch.randn(128, 1024, 1, 1), "f9.weight": torch.randn(192, 195, 1, 1),
             "f10.weight": torch.randn(192, 195, 1, 1), "linear1000.weight": torch.randn(1000, 4096),
             "linear1000.bias": torch.randn(1000)}
    path = tmp_path / "cpn_like.pth"
    torch.save({**state, **extra}, path)
    torch.manual_seed(5)  # a different random init, so equality below proves the load
    loaded = build_backbone("resnet38d", pretrained=str(path))
    assert loaded.weights_source == f"file:{path}"
    got = loaded.state_dict()
    assert set(got) == set(own)
    assert all(torch.equal(got[k], v) for k, v in state.items())
    bns = [m for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, FrozenStatsBatchNorm2d) for m in bns)
    del loaded, got

    path.unlink()
    bad = tmp_path / "missing.pth"
    torch.save({f"module.{k}": v for k, v in own.items() if k != "b4_3.conv_branch2a.weight"}, bad)
    with pytest.raises(WeightsFileError, match=r"missing\.pth.*missing keys 1 \['b4_3\.conv_branch2a\.weight'\]"):
        build_backbone("resnet38d", pretrained=str(bad))
