"""The segmentation stage (issue 14): DeepLab heads, dilated backbone, loss, inference, CRF, eval-seg."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lit_wsss.backbones import build_backbone
from lit_wsss.eval_seg import main as eval_seg
from lit_wsss.losses.segmentation import segmentation_loss
from lit_wsss.modules import DeepLab
from lit_wsss.datamodules.transforms import denormalise
from lit_wsss.modules.segmentation import DeepLabV2Head
from lit_wsss.refine.crf import crf_inference_softmax

PALETTE = [value for index in range(256) for value in (index, (37 * index) % 256, (91 * index) % 256)]


def tiny(**kwargs) -> DeepLab:
    defaults = dict(num_classes=3, backbone="resnet18", pretrained=None, output_stride=16, inference_scales=(1.0,))
    return DeepLab(**{**defaults, **kwargs})


def test_deeplabv2_aspp_is_the_sum_of_four_dilated_convolutions():
    torch.manual_seed(0)
    head = DeepLabV2Head(8, 4, (1, 2, 3, 4))
    features = torch.randn(2, 8, 11, 13)
    expected = sum(F.conv2d(features, conv.weight, conv.bias, padding=rate, dilation=rate)
                   for conv, rate in zip(head.branches, (1, 2, 3, 4)))
    torch.testing.assert_close(head([features]), expected)
    assert all(conv.bias.abs().sum() == 0 for conv in head.branches)  # kazuto1011 init: bias 0, N(0, 0.01)


def test_output_stride_8_dilates_layer3_and_layer4():
    backbone = build_backbone("resnet50", None, strides=(2, 2, 2, 2), dilated_stages=2)
    levels = backbone(torch.randn(1, 3, 65, 65))
    assert backbone.level_strides == (4, 4, 8, 8, 8) and levels[-1].shape[-2:] == (9, 9)
    assert backbone.layer4[1].conv2.dilation == (4, 4) and backbone.layer3[1].conv2.dilation == (2, 2)
    model = DeepLab(num_classes=20, backbone="resnet50", pretrained=None, output_stride=8)
    assert model(torch.randn(1, 3, 65, 65)).shape == (1, 21, 9, 9)
    assert [conv.dilation[0] for conv in model.head.branches] == [6, 12, 18, 24]
    with pytest.raises(ValueError, match="output stride 8"):
        DeepLab(num_classes=3, backbone="resnet18", pretrained=None, output_stride=8)


def test_recipe_defaults_and_frozen_batchnorm():
    model = tiny()
    optimizer_groups = {group["name"]: group for group in model.parameter_groups()}
    assert optimizer_groups["new"]["lr"] == pytest.approx(10 * optimizer_groups["backbone"]["lr"]) == 2.5e-3
    assert not any(p.requires_grad for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)
                   for p in m.parameters())
    assert model.backbone.conv1.weight.requires_grad  # no frozen level: the whole network fine-tunes
    hp = model.hparams
    assert (hp.weight_decay, hp.momentum, hp.sgd_momentum_quirk) == (5e-4, 0.9, False)


@pytest.mark.parametrize("resolution", ["logits", "input"])
def test_loss_of_zero_logits_is_log_of_the_class_count_and_ignores_255(resolution):
    model = tiny(loss_resolution=resolution)
    with torch.no_grad():
        for conv in model.head.branches:
            conv.weight.zero_()
    mask = torch.full((2, 64, 64), 255, dtype=torch.long)
    mask[0, :32] = 1
    mask[1, 40:, 40:] = 3
    loss = model.training_losses({"image": torch.randn(2, 3, 64, 64), "mask": mask})["seg"]
    assert loss.item() == pytest.approx(np.log(4), rel=1e-6)
    with pytest.raises(ValueError, match="seed_dir"):
        model.training_losses({"image": torch.randn(1, 3, 64, 64)})


def test_segmentation_loss_resolutions_on_a_hand_worked_example():
    """Two classes, one confident cell: ``logits`` scores the labels nearest-picked at each cell's top-left pixel,
    ``input`` scores every labelled pixel on bilinearly upsampled logits (align_corners=False)."""
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 0] = np.log(3.0)  # cell (0, 0): p(class 1) = 3/4
    labels = torch.full((1, 4, 4), 255, dtype=torch.long)
    labels[0, 0, 0], labels[0, 1, 1] = 1, 0  # (1, 1) is not a cell's top-left pixel
    assert segmentation_loss(logits, labels, "logits").item() == pytest.approx(-np.log(0.75), rel=1e-6)
    # input size: pixel (0, 0) reads the cell itself, pixel (1, 1) reads 0.75 x 0.75 of it
    expected = (-np.log(0.75) + np.log(1 + 3.0 ** 0.5625)) / 2
    assert segmentation_loss(logits, labels, "input").item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="loss resolution"):
        segmentation_loss(logits, labels, "pixels")


def test_inference_fuses_the_flip_by_the_max_of_the_logits():
    torch.manual_seed(0)
    model = tiny().eval()
    image = torch.randn(3, 37, 45)
    with torch.no_grad():
        logits = F.interpolate(model(torch.stack([image, image.flip(-1)])), (37, 45), mode="bilinear",
                               align_corners=False)
    expected = torch.maximum(logits[0], logits[1].flip(-1))
    torch.testing.assert_close(model.segment(image), expected)
    mean = tiny(inference_fusion="mean")
    mean.load_state_dict(model.state_dict())
    torch.testing.assert_close(mean.eval().segment(image), (logits[0].softmax(0) + logits[1].flip(-1).softmax(0)) / 2)
    assert model.predict_mask(image).shape == (37, 45)


def test_crf_keeps_a_confident_map_and_returns_probabilities():
    rng = np.random.default_rng(0)
    image = np.zeros((20, 24, 3), np.uint8)
    image[:, 12:] = 200
    labels = (np.arange(24)[None, :].repeat(20, 0) >= 12).astype(int)
    probabilities = np.stack([labels == 0, labels == 1]).astype(np.float32) * 0.9 + 0.05
    probabilities += rng.uniform(0, 0.01, probabilities.shape).astype(np.float32)
    probabilities /= probabilities.sum(0, keepdims=True)
    refined = crf_inference_softmax(image, probabilities)
    assert refined.shape == (2, 20, 24)
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-5)
    assert (refined.argmax(0) == labels).all()
    normalised = (torch.from_numpy(image).permute(2, 0, 1) / 255.0 - torch.tensor([0.485, 0.456, 0.406])[:, None, None]
                  ) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    assert (denormalise(normalised) == image).all()


def _write_png(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    png = Image.fromarray(np.asarray(mask, np.uint8))
    png.putpalette(PALETTE)
    png.save(path)


def test_eval_seg_on_a_hand_worked_example(tmp_path, capsys):
    """Same 2 x 3 case as the eval-cam test: IoU (2/3, 1/2, 0), mIoU 7/18, pixel accuracy 3/5."""
    _write_png(tmp_path / "voc" / "SegmentationClass" / "a.png", [[0, 1, 1], [0, 0, 255]])
    _write_png(tmp_path / "pred" / "a.png", [[0, 1, 2], [2, 0, 1]])
    (tmp_path / "ids.txt").write_text("a\n")
    out = tmp_path / "seg.json"
    args = ["--pred", str(tmp_path / "pred"), "--root", str(tmp_path / "voc"), "--list", str(tmp_path / "ids.txt"),
            "--num-classes", "2", "--out", str(out), "--no-progress"]
    assert eval_seg(args) == 0
    result = json.loads(out.read_text())
    assert result["iou"] == pytest.approx([2 / 3, 1 / 2, 0.0]) and result["miou"] == pytest.approx(7 / 18)
    assert result["pixel_accuracy"] == pytest.approx(3 / 5) and result["num_images"] == 1
    assert "mIoU 38.89 %" in capsys.readouterr().out and "| 1 | class_1 | 50.00 |" in out.with_suffix(".md").read_text()
    _write_png(tmp_path / "pred" / "a.png", [[0, 1], [2, 0]])  # wrong size: named
    assert eval_seg(args) == 1
    assert "a.png" in capsys.readouterr().err
