"""Official CPN checkpoints (``network/resnet38_CPN.py`` state dict) -> lit_wsss names (cpn.md §2, §3)."""

import pytest
import torch
from torch import nn

from lit_wsss.checkpoints import (
    convert_official_cpn_state_dict,
    load_initial_state_dict,
    official_layout,
    unwrap_state_dict,
)


def is_official_cpn_state_dict(state):
    layout = official_layout(unwrap_state_dict(state)[0])
    return layout is not None and layout.name == "official CPN checkpoint"


def is_official_irn_state_dict(state):
    layout = official_layout(unwrap_state_dict(state)[0])
    return layout is not None and layout.name == "official IRN/SIPE checkpoint"

# A few keys of each kind, in the official layout, with tiny tensors (only the names matter here).
OFFICIAL_BACKBONE_KEYS = (
    "conv1a.weight",
    "b2.bn_branch2a.weight",
    "b2.bn_branch2a.num_batches_tracked",
    "b2.conv_branch1.weight",
    "b2_1.conv_branch2b1.weight",
    "b4_5.bn_branch2b1.running_var",
    "b5_2.conv_branch2a.weight",
    "b6.bn_branch2b2.running_mean",
    "b7.conv_branch2b2.weight",
    "bn7.weight",
    "bn7.bias",
    "bn7.running_mean",
    "bn7.running_var",
)
OFFICIAL_HEAD_KEYS = ("fc8.weight", "f8_3.weight", "f8_4.weight", "f9.weight", "f10.weight")


def official_state() -> dict[str, torch.Tensor]:
    return {k: torch.full((2,), float(i)) for i, k in enumerate(OFFICIAL_BACKBONE_KEYS + OFFICIAL_HEAD_KEYS)}


def expected_conversion(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {f"backbone.{k}": state[k] for k in OFFICIAL_BACKBONE_KEYS}
    out["classifier.weight"] = state["fc8.weight"]
    out.update({k: state[k] for k in ("f8_3.weight", "f8_4.weight", "f9.weight", "f10.weight")})
    return out


def test_plain_official_dict_converts():
    state = official_state()
    assert is_official_cpn_state_dict(state) and not is_official_irn_state_dict(state)
    converted = convert_official_cpn_state_dict(state)
    expected = expected_conversion(state)
    assert set(converted) == set(expected)
    assert all(converted[k] is v for k, v in expected.items())


def test_dataparallel_prefix_is_stripped():
    state = official_state()
    wrapped = {f"module.{k}": v for k, v in state.items()}
    assert is_official_cpn_state_dict(wrapped)
    converted = convert_official_cpn_state_dict(wrapped)
    assert set(converted) == set(expected_conversion(state))
    assert not any("module." in k for k in converted)


def test_detection_does_not_fire_on_other_layouts():
    irn = {"resnet50.conv1.weight": torch.zeros(1), "stage1.0.weight": torch.zeros(1),
           "classifier.weight": torch.zeros(1)}
    ours = expected_conversion(official_state())  # lit_wsss layout of a CPN model
    resnet = {"conv1.weight": torch.zeros(1), "bn1.weight": torch.zeros(1), "fc.weight": torch.zeros(1)}
    for state in (irn, ours, resnet, {}):
        assert not is_official_cpn_state_dict(state)
    # an ImageNet resnet38d file has no fc8: it is a backbone file, not a CPN checkpoint
    assert not is_official_cpn_state_dict({k: torch.zeros(1) for k in OFFICIAL_BACKBONE_KEYS})


class TinyBackbone(nn.Module):
    """The resnet38d top-level names with tiny layers (conv1a, one basic block b2, bn7)."""

    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 4, 3, bias=False)
        self.b2 = nn.Module()
        self.b2.bn_branch2a = nn.BatchNorm2d(4)
        self.b2.conv_branch2a = nn.Conv2d(4, 4, 3, bias=False)
        self.bn7 = nn.BatchNorm2d(4)


class TinyCPN(nn.Module):
    """lit_wsss layout: ``backbone.*``, ``classifier`` (CPN's fc8), ``f8_3``, ``f8_4``, ``f9``, ``f10``."""

    def __init__(self):
        super().__init__()
        self.backbone = TinyBackbone()
        self.classifier = nn.Conv2d(4, 21, 1, bias=False)
        self.f8_3 = nn.Conv2d(4, 2, 1, bias=False)
        self.f8_4 = nn.Conv2d(4, 2, 1, bias=False)
        self.f9 = nn.Conv2d(7, 3, 1, bias=False)
        self.f10 = nn.Conv2d(7, 3, 1, bias=False)


class TinyOfficialCPN(TinyBackbone):
    """Official layout: backbone layers at top level, fc8 and the PCM/PRCM convs beside them."""

    def __init__(self):
        super().__init__()
        self.fc8 = nn.Conv2d(4, 21, 1, bias=False)
        self.f8_3 = nn.Conv2d(4, 2, 1, bias=False)
        self.f8_4 = nn.Conv2d(4, 2, 1, bias=False)
        self.f9 = nn.Conv2d(7, 3, 1, bias=False)
        self.f10 = nn.Conv2d(7, 3, 1, bias=False)


def test_load_initial_state_dict_reads_dataparallel_checkpoint(tmp_path):
    torch.manual_seed(0)
    official = TinyOfficialCPN()
    path = tmp_path / "cpn.pth"
    torch.save(nn.DataParallel(official).state_dict(), path)
    model = TinyCPN()
    state = load_initial_state_dict(path, model)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.classifier.weight, official.fc8.weight)
    assert torch.equal(model.f10.weight, official.f10.weight)
    assert torch.equal(model.backbone.b2.conv_branch2a.weight, official.b2.conv_branch2a.weight)
    assert torch.equal(model.backbone.bn7.running_var, official.bn7.running_var)

    partial = {k: v for k, v in official.state_dict().items() if not k.startswith("f10.")}
    torch.save(partial, tmp_path / "no_f10.pth")
    with pytest.raises(ValueError, match=r"official CPN checkpoint.*1 missing keys \['f10\.weight'\]"):
        load_initial_state_dict(tmp_path / "no_f10.pth", model)
