"""IRN optimisation recipe: poly schedule, parameter groups, momentum quirk, frozen parts (protocol.md §3, §11.2)."""

import math
from types import SimpleNamespace

import pytest
import torch

from lit_wsss.modules import CAM
from lit_wsss.modules.base import PolyDecay


def make_cam(**kwargs):
    model = CAM(num_classes=4, backbone="resnet18", pretrained=None, **kwargs)
    model._trainer = SimpleNamespace(estimated_stepping_batches=3305)  # what configure_optimizers reads
    return model


def test_poly_values_from_the_author_log():
    decay = PolyDecay(3305, 0.9)
    assert decay(0) == 1.0
    # jiwoon-ahn/irn#13: lr 0.1 at step 2300 of 3305 prints 0.0343
    assert round(0.1 * decay(2300), 4) == 0.0343
    assert math.isclose(decay(3304), (1 / 3305) ** 0.9)
    assert decay(3305) == 0.0 and decay(4000) == 0.0


def test_parameter_groups_and_learning_rates_follow_the_scheduler():
    model = make_cam()
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    groups = {g["name"]: g for g in optimizer.param_groups}
    backbone_params = {id(p) for name, p in model.named_parameters() if name.startswith("backbone.layer3")
                       or name.startswith("backbone.layer4")}
    assert {id(p) for p in groups["backbone"]["params"]} == backbone_params
    assert [id(p) for p in groups["new"]["params"]] == [id(model.classifier.weight)]
    assert groups["backbone"]["lr"] == pytest.approx(0.1) and groups["new"]["lr"] == pytest.approx(1.0)
    for _ in range(2300):
        optimizer.step()  # no gradients: parameters stay, only the step counter matters
        scheduler.step()
    assert round(groups["backbone"]["lr"], 4) == 0.0343
    assert groups["new"]["lr"] == pytest.approx(10 * groups["backbone"]["lr"])


def test_momentum_quirk_by_default_and_textbook_sgd_behind_the_flag():
    quirk = make_cam().configure_optimizers()["optimizer"]
    assert all(g["momentum"] == 1e-4 and g["weight_decay"] == 1e-4 for g in quirk.param_groups)
    textbook = make_cam(sgd_momentum_quirk=False).configure_optimizers()["optimizer"]
    assert all(g["momentum"] == 0.9 for g in textbook.param_groups)


def test_frozen_parameters_and_bn_statistics_unchanged_after_a_step():
    model = make_cam()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = model.configure_optimizers()["optimizer"]
    batch = {"image": torch.randn(2, 3, 64, 64), "labels": torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])}
    loss = sum(model.training_losses(batch).values())
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    frozen_prefixes = ("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2")
    for key, value in before.items():
        if key.startswith(frozen_prefixes) or "running_" in key or "num_batches_tracked" in key:
            assert torch.equal(after[key], value), f"{key} changed"
    for key in ("backbone.layer3.0.conv1.weight", "backbone.layer4.1.bn2.weight", "classifier.weight"):
        assert not torch.equal(after[key], before[key]), f"{key} did not train"
    # no frozen parameter even receives a gradient (so DDP sees no unused trainable parameters)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
