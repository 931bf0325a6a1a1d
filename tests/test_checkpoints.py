"""Weights people already have: an official IRN ``res50_cam.pth`` layout loads with no missing/unexpected keys."""

import pytest
import torch
import torchvision
from torch import nn

from lit_wsss.modules import CAM


class OfficialIRNCamNet(nn.Module):
    """The key layout of jiwoon-ahn/irn ``net/resnet50_cam.py`` ``Net``: a ResNet-50 without fc, whose parts are
    registered again as stage1..stage4, plus a 20-way 1x1 classifier without bias."""

    def __init__(self):
        super().__init__()
        self.resnet50 = torchvision.models.resnet50(weights=None)
        del self.resnet50.fc
        r = self.resnet50
        # IRN strides (2, 2, 2, 1): layer4 keeps the resolution, without dilation
        r.layer4[0].conv2.stride = (1, 1)
        r.layer4[0].downsample[0].stride = (1, 1)
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.stage2 = nn.Sequential(r.layer2)
        self.stage3 = nn.Sequential(r.layer3)
        self.stage4 = nn.Sequential(r.layer4)
        self.classifier = nn.Conv2d(2048, 20, 1, bias=False)


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = OfficialIRNCamNet()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):  # non-default statistics, so a wrong mapping shows
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("irn") / "res50_cam.pth"
    torch.save(net.state_dict(), path)
    return path, net


def test_official_layout_loads_without_missing_or_unexpected_keys(official_checkpoint):
    path, net = official_checkpoint
    model = CAM(num_classes=20, backbone="resnet50", pretrained=None, init_weights=str(path))
    ours = model.state_dict()
    theirs = net.resnet50.state_dict()
    assert {k for k in ours if k.startswith("backbone.")} == {"backbone." + k for k in theirs}
    for key, value in theirs.items():
        assert torch.equal(ours["backbone." + key], value), key
    assert torch.equal(ours["classifier.weight"], net.classifier.weight)
    # and the converted model computes what the official one computes (eval-mode BN = FixedBatchNorm)
    net.eval()
    model.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = net.classifier(net.stage4(net.stage3(net.stage2(net.stage1(image)))).mean((2, 3), keepdim=True))
        assert torch.allclose(model(image), expected.flatten(1), atol=1e-4)


def test_own_checkpoint_round_trip_and_mismatch_errors(tmp_path, official_checkpoint):
    model = CAM(num_classes=3, backbone="resnet18", pretrained=None)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.6"}, path)
    reloaded = CAM(num_classes=3, backbone="resnet18", pretrained=None, init_weights=str(path))
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="missing keys"):
        CAM(num_classes=20, backbone="resnet18", pretrained=None, init_weights=str(official_checkpoint[0]))
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        CAM(num_classes=3, backbone="resnet18", pretrained=None, init_weights=str(tmp_path / "no_such.pth"))


def test_official_sipe_layout_loads_into_sipe(tmp_path):
    """chenqi1126/SIPE ``network/resnet50_SIPE.py``: the IRN ResNet-50 attribute with its own stage grouping,
    side1..side4 and a 20-way classifier (sipe.md §2); stage aliases are recognised by value."""
    from lit_wsss.modules import SIPE

    torch.manual_seed(0)
    net = nn.Module()
    net.resnet50 = torchvision.models.resnet50(weights=None)
    del net.resnet50.fc
    r = net.resnet50
    net.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)  # a grouping other than IRN's
    net.stage2, net.stage3, net.stage4, net.stage5 = (nn.Sequential(x) for x in (r.layer1, r.layer2, r.layer3, r.layer4))
    for index, (cin, cout) in enumerate(((256, 128), (512, 128), (1024, 256), (2048, 256)), start=1):
        setattr(net, f"side{index}", nn.Conv2d(cin, cout, 1, bias=False))
    net.classifier = nn.Conv2d(2048, 20, 1, bias=False)
    path = tmp_path / "final.pth"
    torch.save(net.state_dict(), path)
    model = SIPE(num_classes=20, backbone="resnet50", pretrained=None, init_weights=str(path))
    assert torch.equal(model.side3.weight, net.side3.weight)
    assert torch.equal(model.backbone.layer3[2].conv2.weight, r.layer3[2].conv2.weight)
    # a stage alias that is not a copy of any resnet50 tensor is refused
    state = net.state_dict()
    state["stage3.0.0.conv1.weight"] = state["stage3.0.0.conv1.weight"] + 1
    torch.save(state, path)
    with pytest.raises(ValueError, match="stage3.0.0.conv1.weight"):
        SIPE(num_classes=20, backbone="resnet50", pretrained=None, init_weights=str(path))
