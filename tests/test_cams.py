"""Multi-scale + flip CAM inference and CAM -> mask decoding (protocol.md §4, §5, §11 items 3-4)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lit_wsss.cams import NORM_EPS, cams_to_mask, multiscale_cams, scaled_size


def stub_cam_fn(num_classes: int = 5, stride: int = 4):
    """A fixed non-negative 'network': 1x1 conv then stride-s average pooling with ceil mode, then ReLU."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(num_classes, 3, 1, 1, generator=generator)

    def cam_fn(x):
        return F.relu(F.avg_pool2d(F.conv2d(x, weight), stride, ceil_mode=True))

    return cam_fn


@pytest.mark.parametrize("height,width", [(37, 50), (64, 48), (33, 17)])
def test_shapes_and_normalisation(height, width):
    image = torch.randn(3, height, width)
    keys = torch.tensor([0, 3])
    record = multiscale_cams(stub_cam_fn(), image, keys)
    assert record["high_res"].shape == (2, height, width)
    assert record["cam"].shape == (2, math.ceil(height / 4), math.ceil(width / 4))
    assert torch.equal(record["keys"], keys)
    for cams in (record["high_res"], record["cam"]):
        assert cams.min() >= 0
        channel_max = cams.flatten(1).amax(1)
        # each channel divided by (its max + 1e-5): the max is just below 1
        assert torch.all(channel_max < 1) and torch.all(channel_max >= 1 - 1e-4)


def test_flip_symmetry():
    # sizes that are multiples of 16, so no crop of the padded map breaks the symmetry
    image = torch.randn(3, 48, 64)
    keys = torch.tensor([1, 2, 4])
    record = multiscale_cams(stub_cam_fn(), image, keys)
    flipped = multiscale_cams(stub_cam_fn(), image.flip(-1), keys)
    assert torch.allclose(flipped["high_res"], record["high_res"].flip(-1), atol=1e-5)
    assert torch.allclose(flipped["cam"], record["cam"].flip(-1), atol=1e-5)


def test_single_scale_identity_network_is_flip_sum_normalised():
    # cam_fn = first channel, unchanged size: high_res = (x + flip(flip(x))) / max = x / (max + eps)
    x = torch.rand(1, 32, 48)
    image = torch.cat([x, torch.zeros(2, 32, 48)])
    record = multiscale_cams(lambda batch: batch[:, :1], image, torch.tensor([0]), scales=(1.0,))
    expected = 2 * x / (2 * x.max() + NORM_EPS)
    assert torch.allclose(record["high_res"], expected, atol=1e-6)


def test_only_label_channels_are_exported():
    def cam_fn(batch):
        n, _, h, w = batch.shape
        cams = torch.zeros(n, 4, h, w)
        cams[:, 2] = 1.0  # only class 2 fires
        return cams

    record = multiscale_cams(cam_fn, torch.randn(3, 16, 16), torch.tensor([2, 0]))
    assert record["high_res"][0].min() > 0.99 and record["high_res"][1].abs().max() == 0


def test_scaled_size_rounds_half_to_even_like_numpy():
    assert scaled_size(375, 500, 0.5) == (188, 250)  # 187.5 -> 188 (even)
    assert scaled_size(333, 500, 1.5) == (500, 750)  # 499.5 -> 500
    assert scaled_size(5, 7, 0.5) == (2, 4)  # 2.5 -> 2, 3.5 -> 4


def test_cams_to_mask_background_plane_and_key_mapping():
    high_res = torch.tensor([[[0.9, 0.1], [0.2, 0.5]], [[0.3, 0.05], [0.6, 0.5]]])
    keys = torch.tensor([6, 14])  # car -> id 7, person -> id 15
    mask = cams_to_mask(high_res, keys, bg_threshold=0.15)
    # ties go to the first channel (background first, then the lower key index), like numpy argmax
    assert mask.tolist() == [[7, 0], [15, 7]]
    assert (cams_to_mask(high_res, keys, bg_threshold=1.0) == 0).all()  # tau above every CAM value


def test_predict_step_crops_padding_and_keeps_label_channels():
    from lit_wsss.modules import CAM

    model = CAM(num_classes=4, backbone="resnet18", pretrained=None, cam_scales=(1.0,)).eval()
    batch = {
        "image": torch.randn(2, 3, 40, 48),
        "labels": torch.tensor([[0.0, 1, 0, 1], [1.0, 0, 0, 0]]),
        "image_id": ["2000_000001", "2000_000002"],
        "size": torch.tensor([[40, 48], [33, 21]]),  # the second image was padded by the collate
    }
    first, second = model.predict_step(batch, 0)
    assert first["image_id"] == "2000_000001" and first["keys"].tolist() == [1, 3]
    assert first["high_res"].shape == (2, 40, 48) and first["cam"].shape == (2, 10, 12)
    assert second["keys"].tolist() == [0] and second["high_res"].shape == (1, 33, 21)
    assert second["cam"].shape == (1, 9, 6)


def test_image_without_labels_gives_empty_maps():
    from lit_wsss.cams import multiscale_cams

    record = multiscale_cams(lambda x: torch.relu(x[:, :2]), torch.randn(3, 20, 30), torch.zeros(0, dtype=torch.long),
                             (1.0, 0.5))
    assert record["cam"].shape == (0, 5, 8) and record["high_res"].shape == (0, 20, 30)
