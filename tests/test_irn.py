"""IRNet module on the shared base: heads, parameter groups, frozen backbone, boundary and pseudo labels."""

import math

import pytest
import torch

from lit_wsss.modules import IRN


@pytest.fixture(scope="module")
def irn():
    torch.manual_seed(0)
    model = IRN(num_classes=4, backbone="resnet18", pretrained=None, crop_size=128)
    from types import SimpleNamespace

    model._trainer = SimpleNamespace(estimated_stepping_batches=990)
    return model


def test_parameter_groups_and_frozen_backbone(irn):
    optimizer = irn.configure_optimizers()["optimizer"]
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["edge"]["lr"] == pytest.approx(0.1) and groups["displacement"]["lr"] == pytest.approx(1.0)
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(p.requires_grad for p in irn.backbone.parameters())
    assert grouped == {id(p) for p in irn.parameters() if p.requires_grad}
    assert all(g["momentum"] == 1e-4 for g in optimizer.param_groups)  # IRN's PolyOptimizer quirk


def test_training_step_trains_only_the_heads(irn):
    before = {k: v.clone() for k, v in irn.state_dict().items()}
    optimizer = irn.configure_optimizers()["optimizer"]
    mask = torch.zeros(2, 128, 128, dtype=torch.long)
    mask[:, 40:90, 30:100] = 2
    mask[:, :, 120:] = 255
    batch = {"image": torch.randn(2, 3, 128, 128), "mask": mask}
    losses = irn.training_losses(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    optimizer.step()
    after = irn.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("backbone."))
    assert not torch.equal(after["edge_out.weight"], before["edge_out.weight"])
    assert not torch.equal(after["disp_out.3.weight"], before["disp_out.3.weight"])


def test_boundary_and_pseudo_labels(irn):
    irn.eval()
    height, width = 70, 90
    boundary = irn.boundary(torch.randn(3, height, width), height, width)
    assert boundary.shape == (math.ceil(height / 4), math.ceil(width / 4))
    assert boundary.min() >= 0 and boundary.max() <= 1
    keys = torch.tensor([1, 3])
    batch = {
        "image": torch.randn(1, 3, height, width), "image_id": ["2000_000001"], "size": torch.tensor([[height, width]]),
        "cam": [torch.rand(2, math.ceil(height / 4), math.ceil(width / 4))], "keys": [keys],
    }
    (record,) = irn.predict_step(batch, 0)
    assert record["labels"].shape == (height, width) and record["high_res"].shape == (2, height, width)
    assert record["high_res"].dtype == torch.float16 and record["high_res"].max() <= 1
    assert set(record["labels"].unique().tolist()) <= {0, 2, 4}


def test_the_fit_canvas_is_the_image_itself_and_irns_pads_to_512(irn):
    """``fit``: a 64 x 80 image (multiples of 16) is not padded at all; ``irn``: padded with zeros to 512 x 512."""
    irn.eval()
    torch.manual_seed(1)
    image = torch.randn(3, 64, 80)

    def fused(canvas: torch.Tensor) -> torch.Tensor:  # the flip fusion of §6.5 on a given canvas, by hand
        with torch.no_grad():
            edge, _ = irn(torch.stack([canvas, canvas.flip(-1)]))
        return torch.sigmoid(edge[0, 0] / 2 + edge[1, 0].flip(-1) / 2)[:16, :20]

    irn.hparams.boundary_canvas = "fit"
    try:
        fit = irn.boundary(image, 64, 80)
    finally:
        irn.hparams.boundary_canvas = "irn"
    padded = torch.zeros(3, 512, 512)
    padded[:, :64, :80] = image
    torch.testing.assert_close(fit, fused(image))
    torch.testing.assert_close(irn.boundary(image, 64, 80), fused(padded))
    assert not torch.allclose(fit, fused(padded), atol=1e-3)  # the padding reaches into the image's boundary map
    with pytest.raises(ValueError, match="boundary_canvas"):
        IRN(num_classes=4, backbone="resnet18", pretrained=None, boundary_canvas="square")
