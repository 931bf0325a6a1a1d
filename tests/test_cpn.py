"""CPN as a LightningModule: triplet forward, frozen parts, export/evaluation, official layout, CLI.

cpn.md §12 items 6-9 at the module level (items 1-7 on the pure functions are in test_cpn_losses.py and
test_complementary_pair.py; the backbone's frozen BN in test_resnet38d.py).
"""

import sys

import numpy as np
import pytest
import torch
from torch import nn

from lit_wsss.cams import cams_to_mask
from lit_wsss.checkpoints import convert_official_cpn_state_dict
from lit_wsss.cli import main
from lit_wsss.datamodules.transforms import build_train_transform
from lit_wsss.metrics import ThresholdSweep
from lit_wsss.modules import CPN
from lit_wsss.stages import configs



def make_cpn(**kwargs) -> CPN:
    torch.manual_seed(0)
    return CPN(num_classes=3, backbone="resnet18", pretrained=None, **kwargs)


def batch(keep: torch.Tensor, size: int = 64) -> dict:
    torch.manual_seed(1)
    return {"image": torch.randn(2, 3, size, size), "labels": torch.tensor([[1.0, 0, 1], [0, 1, 0]]),
            "patch_keep": [keep, keep], "rho": [float(keep.float().mean())] * 2}


def test_nothing_hidden_gives_zero_cp_loss():
    """§12 item 6: rho = 1 (x1 = x, x2 = 0) with dropout off => L_cp = 0 (and L_cpr = 0)."""
    model = make_cpn().eval()  # eval: dropout off; BN is frozen either way
    losses = model.training_losses(batch(torch.ones(64, 64, dtype=torch.bool)))
    assert float(losses["cp"].detach()) == 0.0 and float(losses["cpr"].detach()) == 0.0
    half = torch.zeros(64, 64, dtype=torch.bool)
    half[:, :32] = True
    assert float(model.training_losses(batch(half))["cp"].detach()) > 0


def test_no_loss_reaches_frozen_layers_or_batchnorm():
    """§12 items 7 and 8: nothing reaches the frozen levels or any BN parameter; BN statistics never move."""
    model = make_cpn().train()
    bn_state = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    half = torch.zeros(64, 64, dtype=torch.bool)
    half[::2] = True
    losses = model.training_losses(batch(half))
    sum(losses.values()).backward()
    for name, parameter in model.backbone.named_parameters():
        is_bn = isinstance(model.backbone.get_submodule(name.rsplit(".", 1)[0]), nn.BatchNorm2d)
        if is_bn or name.startswith("conv1."):  # frozen_levels=1: the stem (ResNet-38d: conv1a, b2*)
            assert not parameter.requires_grad and parameter.grad is None, name
    assert model.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0
    for head in ("f8_3", "f8_4", "f9", "f10", "classifier"):
        assert getattr(model, head).weight.grad.abs().sum() > 0, head
    # fc8's background row gets no loss gradient (§5: only weight decay)
    assert model.classifier.weight.grad[0].abs().sum() == 0
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    optimizer.step()
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in bn_state.items())


def test_prcm_flag_reaches_the_head(monkeypatch):
    """C7: the official reshape by default, the transpose behind the flag (the two PRCM semantics are
    compared on random tensors in test_cpn_losses.py; here only the routing of the flag is checked)."""
    import lit_wsss.modules.cpn as cpn_module

    seen = []
    original = cpn_module.refined_cam

    def spy(*args, key_transpose, **kwargs):
        seen.append(key_transpose)
        return original(*args, key_transpose=key_transpose, **kwargs)

    monkeypatch.setattr(cpn_module, "refined_cam", spy)
    image = torch.randn(1, 3, 64, 64)
    make_cpn().eval().head(image)
    make_cpn(prcm_key_transpose=True).eval().head(image)
    assert seen == [False, True]


def test_export_and_evaluation():
    """§12 item 9: halved t = 0.5 == unit tau = 1.0; absent classes never predicted; GT 255 ignored."""
    model = make_cpn().eval()
    torch.manual_seed(2)
    image, labels = torch.randn(3, 45, 61), torch.tensor([1.0, 0.0, 1.0])
    record = model.infer_cams(image, labels)
    assert record["keys"].tolist() == [0, 2] and "bg" not in record
    high = record["high_res"]
    assert high.shape == (2, 45, 61) and record["cam"].shape == (2, 12, 16)
    assert high.min() == 0 and ((high.flatten(1).amax(1) > 1 - 1e-3) & (high.flatten(1).amax(1) < 1)).all()
    for t in (0.25, 0.5, 0.3):
        assert torch.equal(cams_to_mask(high / 2, record["keys"], t), cams_to_mask(high, record["keys"], 2 * t))
    labels_seen = set(cams_to_mask(high, record["keys"], 0.4).unique().tolist())
    assert labels_seen <= {0, 1, 3} and 2 not in labels_seen
    # 255 is ignored: marking half of the ground truth void removes exactly those pixels from the counts
    mask = torch.zeros(45, 61, dtype=torch.long)
    mask[10:30, 20:50] = 3
    full, void = ThresholdSweep(3, [0.5]), ThresholdSweep(3, [0.5])
    full.update(high, record["keys"], mask)
    voided = mask.clone()
    voided[:, 30:] = 255
    void.update(high, record["keys"], voided)
    left = ThresholdSweep(3, [0.5])
    left.update(high[:, :, :30], record["keys"], mask[:, :30])
    assert torch.equal(void.compute()["confusion"], left.compute()["confusion"])
    assert int(void.compute()["confusion"].sum()) == 45 * 30 < int(full.compute()["confusion"].sum())
    # flip-symmetric fusion
    flipped = model.infer_cams(image.flip(-1), labels)
    torch.testing.assert_close(flipped["high_res"], high.flip(-1), atol=1e-4, rtol=0)


def test_official_cpn_layout_matches_the_resnet38d_module():
    """An official Net state dict (top-level resnet38d keys, fc8, f8_3, f8_4, f9, f10) converts onto CPN's keys."""
    model = CPN(num_classes=20, backbone="resnet38d", pretrained=None)
    ours = model.state_dict()
    official = {}
    for key, value in ours.items():
        if key.startswith("backbone."):
            official[key[len("backbone."):]] = value
        elif key.startswith("classifier."):
            official["fc8." + key[len("classifier."):]] = value
        else:
            official[key] = value
    assert {"conv1a.weight", "b7.conv_branch2b2.weight", "fc8.weight", "f9.weight"} <= set(official)
    assert official["fc8.weight"].shape == (21, 4096, 1, 1) and official["f9.weight"].shape == (192, 195, 1, 1)
    converted = convert_official_cpn_state_dict({"module." + k: v for k, v in official.items()})
    assert set(converted) == set(ours)
    assert model.f8_3.weight.shape[1] == 512 and model.f8_4.weight.shape[1] == 1024
    assert sum(p.requires_grad for p in model.backbone.parameters()) and not any(
        p.requires_grad for n, p in model.backbone.named_parameters() if n.startswith(("conv1a.", "b2.", "b2_")))


def test_missing_patch_mask_is_named():
    data = batch(torch.ones(64, 64, dtype=torch.bool))
    del data["patch_keep"]
    with pytest.raises(ValueError, match="cpn_superpixel"):
        make_cpn().training_losses(data)


def test_transform_draws_reproducible_masks():
    image = (np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8)
    outputs = []
    for _ in range(2):
        transform = build_train_transform("cpn_grid", 64, (64, 96))
        transform.set_random_seed(5)
        outputs.append(transform(image=image))
    assert torch.equal(outputs[0]["image"], outputs[1]["image"])
    assert torch.equal(outputs[0]["patch_keep"], outputs[1]["patch_keep"]) and outputs[0]["rho"] == outputs[1]["rho"]
    assert outputs[0]["rho"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # grid cells of crop/2 and crop
    with pytest.raises(ValueError, match="mask"):  # the CPN pipeline is for training splits: no masks
        build_train_transform("irn_cls_valid", 64, (64, 96))(image=image, mask=image[..., 0])


@pytest.mark.filterwarnings("ignore:The number of training batches")
def test_cli_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    main(["fit", *configs("synth", "cpn"),
          f"--data.init_args.root={tmp_path / 'synthetic'}", "--data.init_args.num_train=4",
          "--data.init_args.num_val=2", "--data.init_args.num_workers=0", "--data.init_args.crop_size=64",
          "--data.init_args.batch_size=2", "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=null",
          "--model.init_args.cam_scales=[1.0]", "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
