"""Weights people already have: official checkpoints of IRN, SIPE, VWE and GSLM load with no missing or
unexpected keys (issue 13). No official file is available here, so each test builds a network with the
official module structure (attribute names, Sequential groupings, nn.ModuleList aliases, file wrapper) and
saves its ``state_dict()`` exactly as the official training script does."""

import pytest
import torch
import torchvision
from torch import nn

from lit_wsss.modules import CAM, GSLM, SIPE, VWE


def _randomise_bn(net: nn.Module) -> None:
    """Non-default statistics, so that a wrong mapping shows."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)


def _irn_resnet50() -> nn.Module:
    """IRN's ResNet-50: strides (2, 2, 2, 1), no fc (layer4 keeps the resolution, without dilation)."""
    net = torchvision.models.resnet50(weights=None)
    del net.fc
    net.layer4[0].conv2.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    return net


class OfficialIRNCamNet(nn.Module):
    """jiwoon-ahn/irn ``net/resnet50_cam.py`` ``Net``: attribute ``resnet50``, its parts again as stage1..stage4,
    and a third time through ``self.backbone = nn.ModuleList(stages)``; the classifier also in
    ``self.newly_added = nn.ModuleList([classifier])``."""

    def __init__(self):
        super().__init__()
        self.resnet50 = r = _irn_resnet50()
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.stage2 = nn.Sequential(r.layer2)
        self.stage3 = nn.Sequential(r.layer3)
        self.stage4 = nn.Sequential(r.layer4)
        self.classifier = nn.Conv2d(2048, 20, 1, bias=False)
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier])

    def logits(self, image):
        features = self.stage4(self.stage3(self.stage2(self.stage1(image))))
        return self.classifier(features.mean((2, 3), keepdim=True)).flatten(1)


@pytest.fixture(scope="module")
def official_irn(tmp_path_factory):
    torch.manual_seed(0)
    net = OfficialIRNCamNet()
    _randomise_bn(net)
    path = tmp_path_factory.mktemp("irn") / "res50_cam.pth"
    torch.save(net.state_dict(), path)  # step/train_cam.py: torch.save(model.module.state_dict(), ...)
    return path, net


def test_official_irn_layout_has_the_aliases_and_loads(official_irn):
    path, net = official_irn
    keys = set(torch.load(path, weights_only=True))
    assert {"resnet50.conv1.weight", "stage1.0.weight", "backbone.0.0.weight", "newly_added.0.weight"} <= keys
    model = CAM(num_classes=20, backbone="resnet50", pretrained=None, init_weights=str(path))
    ours = model.state_dict()
    theirs = net.resnet50.state_dict()
    assert {k for k in ours if k.startswith("backbone.")} == {"backbone." + k for k in theirs}
    for key, value in theirs.items():
        assert torch.equal(ours["backbone." + key], value), key
    assert torch.equal(ours["classifier.weight"], net.classifier.weight)
    # the converted model computes what the official one computes (eval-mode BN = FixedBatchNorm)
    net.eval()
    model.eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(image), net.logits(image), atol=1e-4)


def test_own_checkpoint_round_trip_and_mismatch_errors(tmp_path, official_irn):
    model = CAM(num_classes=3, backbone="resnet18", pretrained=None)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.6"}, path)
    reloaded = CAM(num_classes=3, backbone="resnet18", pretrained=None, init_weights=str(path))
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="missing keys"):
        CAM(num_classes=20, backbone="resnet18", pretrained=None, init_weights=str(official_irn[0]))
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        CAM(num_classes=3, backbone="resnet18", pretrained=None, init_weights=str(tmp_path / "no_such.pth"))


def test_an_alias_that_is_not_a_copy_is_refused_by_name(tmp_path, official_irn):
    state = {k: v.clone() for k, v in torch.load(official_irn[0], weights_only=True).items()}
    state["backbone.2.0.0.conv1.weight"] += 1  # no longer the tensor of resnet50.layer3.0.conv1
    path = tmp_path / "edited.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"backbone\.2\.0\.0\.conv1\.weight"):
        CAM(num_classes=20, backbone="resnet50", pretrained=None, init_weights=str(path))


class OfficialSIPENet(nn.Module):
    """chenqi1126/SIPE ``network/resnet50_SIPE.py`` ``Net``: ``resnet50``, stage0 (stem) .. stage4, side1..4, a
    20-way classifier, and both module lists (backbone = the stages, newly_added = classifier + sides)."""

    def __init__(self):
        super().__init__()
        self.resnet50 = r = _irn_resnet50()
        self.stage0 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool)
        self.stage1, self.stage2, self.stage3, self.stage4 = (nn.Sequential(x) for x in
                                                              (r.layer1, r.layer2, r.layer3, r.layer4))
        self.side1 = nn.Conv2d(256, 128, 1, bias=False)
        self.side2 = nn.Conv2d(512, 128, 1, bias=False)
        self.side3 = nn.Conv2d(1024, 256, 1, bias=False)
        self.side4 = nn.Conv2d(2048, 256, 1, bias=False)
        self.classifier = nn.Conv2d(2048, 20, 1, bias=False)
        self.backbone = nn.ModuleList([self.stage0, self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier, self.side1, self.side2, self.side3, self.side4])


def test_official_sipe_file_loads_into_sipe(tmp_path):
    torch.manual_seed(0)
    net = OfficialSIPENet()
    _randomise_bn(net)
    state = net.state_dict()
    assert len(state) == 964 and len({v.untyped_storage().data_ptr() for v in state.values()}) == 323
    path = tmp_path / "final.pth"
    torch.save({"net": state}, path)  # train_resnet50_SIPE.py; make_cam.py reads checkpoint['net']
    model = SIPE(num_classes=20, backbone="resnet50", pretrained=None, init_weights=str(path))
    assert torch.equal(model.side3.weight, net.side3.weight)
    assert torch.equal(model.classifier.weight, net.classifier.weight)
    assert torch.equal(model.backbone.layer3[2].conv2.weight, net.resnet50.layer3[2].conv2.weight)
    assert torch.equal(model.backbone.bn1.running_var, net.resnet50.bn1.running_var)


class OfficialVWENet(nn.Module):
    """rulixiang/vwe ``network/resnet_cam.py`` ``Net``: ``resnet``, stage1..4, classifier, fc_a, fc_b, the
    ``VWE`` module holding ``centroid`` (K, 2048, 1, 1), and both module lists."""

    def __init__(self, k_words: int):
        super().__init__()
        self.resnet = r = _irn_resnet50()
        self.stage1 = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1)
        self.stage2, self.stage3, self.stage4 = (nn.Sequential(x) for x in (r.layer2, r.layer3, r.layer4))
        self.classifier = nn.Conv2d(2048, 20, 1, bias=False)
        self.fc_a = nn.Conv2d(k_words, 20, 1, bias=False)
        self.fc_b = nn.Conv2d(2048, k_words, 1, bias=False)
        self.VWE = nn.Module()
        self.VWE.centroid = nn.Parameter(torch.randn(k_words, 2048, 1, 1))
        self.backbone = nn.ModuleList([self.stage1, self.stage2, self.stage3, self.stage4])
        self.newly_added = nn.ModuleList([self.classifier, self.VWE, self.fc_a, self.fc_b])


def test_official_vwe_file_loads_into_vwe(tmp_path):
    torch.manual_seed(0)
    net = OfficialVWENet(k_words=16)
    _randomise_bn(net)
    path = tmp_path / "resnet_cam.pth"
    torch.save(net.state_dict(), path)
    assert "VWE.centroid" in torch.load(path, weights_only=True)
    model = VWE(num_classes=20, num_words=16, backbone="resnet50", pretrained=None, init_weights=str(path))
    assert torch.equal(model.codebook, net.VWE.centroid.view(16, 2048))
    assert torch.equal(model.fc_a.weight, net.fc_a.weight) and torch.equal(model.fc_b.weight, net.fc_b.weight)
    assert torch.equal(model.classifier.weight, net.classifier.weight)
    assert torch.equal(model.backbone.layer2[1].bn2.running_mean, net.resnet.layer2[1].bn2.running_mean)


class OfficialGSLMNet(nn.Module):
    """tmlr-group/GSLM ``net/extractor/resnet50_cam.py`` (GLM) and, with ``wam``, ``resnet50_wam.py`` (SLM): the
    ResNet is a local variable and the lists are plain Python lists, so only stage1..stage4 name the backbone;
    the SLM adds ``mapping = Sequential(AdaptiveAvgPool2d(32), Conv2d(C, C, 32, bias=False))``."""

    def __init__(self, wam: bool):
        super().__init__()
        base = _irn_resnet50()
        self.stage1 = nn.Sequential(base.conv1, base.bn1, base.relu, base.maxpool, base.layer1)
        self.stage2, self.stage3, self.stage4 = (nn.Sequential(x) for x in (base.layer2, base.layer3, base.layer4))
        self.classifier = nn.Conv2d(2048, 20, 1, bias=False)
        self.backbone = [self.stage1, self.stage2, self.stage3, self.stage4]  # not registered
        self.newly_added = [self.classifier]
        if wam:
            self.mapping = nn.Sequential(nn.AdaptiveAvgPool2d((32, 32)), nn.Conv2d(20, 20, 32, bias=False))
            self.newly_added.append(self.mapping)

    def cam_logits(self, image):
        return self.classifier(self.stage4(self.stage3(self.stage2(self.stage1(image)))))


@pytest.fixture(scope="module")
def official_gslm(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gslm")
    nets = {"glm": OfficialGSLMNet(wam=False), "slm": OfficialGSLMNet(wam=True)}
    paths = {}
    for name, net in nets.items():
        _randomise_bn(net)
        paths[name] = folder / f"res50_{'cam' if name == 'glm' else 'wam'}.pth"
        torch.save(net.state_dict(), paths[name])
    return paths, nets


def test_official_gslm_glm_loads_into_cam_and_as_glm_weights(official_gslm):
    paths, nets = official_gslm
    assert not any(k.startswith(("resnet50.", "backbone.")) for k in torch.load(paths["glm"], weights_only=True))
    image = torch.randn(1, 3, 64, 64)
    cam = CAM(num_classes=20, backbone="resnet50", pretrained=None, init_weights=str(paths["glm"])).eval()
    glm = nets["glm"].eval()
    with torch.no_grad():
        assert torch.allclose(cam.classifier(cam.features(image)), glm.cam_logits(image), atol=1e-4)
    slm = GSLM(num_classes=20, backbone="resnet50", pretrained=None, glm_weights=str(paths["glm"]))
    assert torch.equal(slm.backbone.layer4[2].conv3.weight, glm.stage4[0][2].conv3.weight)
    assert torch.equal(slm.classifier.weight, glm.classifier.weight)


def test_official_gslm_slm_loads_into_gslm(official_gslm):
    paths, nets = official_gslm
    slm_net = nets["slm"]
    model = GSLM(num_classes=20, backbone="resnet50", pretrained=None, init_weights=str(paths["slm"]))
    assert torch.equal(model.pool.weight, slm_net.mapping[1].weight)
    assert torch.equal(model.backbone.conv1.weight, slm_net.stage1[0].weight)
    assert torch.equal(model.backbone.layer1[0].bn1.running_mean, slm_net.stage1[4][0].bn1.running_mean)
    # the SLM's pooling head is not part of a CAM network: named, not dropped
    with pytest.raises(ValueError, match=r"official GSLM checkpoint.*unexpected keys \['pool.weight'\]"):
        CAM(num_classes=20, backbone="resnet50", pretrained=None, init_weights=str(paths["slm"]))
