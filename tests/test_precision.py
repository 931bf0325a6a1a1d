"""bf16-mixed and channels_last on the CPU (issue 18): training, CAM export, IRNet's loss and walk.

Lightning runs ``bf16-mixed`` on the CPU with ``torch.autocast("cpu", torch.bfloat16)``, the same code paths
as on a GPU (lit_wsss.precision); tests/test_gpu.py runs the stages on a CUDA device.
"""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from test_writers import make_datamodule

from lit_wsss.callbacks import CAMWriter, ChannelsLast
from lit_wsss.callbacks.writer import _to_numpy
from lit_wsss.cams import cams_to_mask
from lit_wsss.checkpoints import read_weights_file
from lit_wsss.losses.irn import irn_loss
from lit_wsss.modules import CAM
from lit_wsss.refine.path_index import PathIndex, affinity_labels
from lit_wsss.refine.random_walk import random_walk

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

CHANNELS_LAST = torch.channels_last


def tiny_cam() -> CAM:
    torch.manual_seed(0)
    return CAM(num_classes=3, backbone="resnet18", pretrained=None, cam_scales=(1.0,))


def trainer(root, precision="32-true", callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root), callbacks=list(callbacks), **kwargs)


class LossRecorder(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The 4 + 5 synthetic images of test_writers, 64-px crops in batches of 2 (two steps an epoch)."""
    datamodule = make_datamodule(tmp_path_factory.mktemp("synthetic") / "synthetic", batch_size=2, crop_size=64)
    datamodule.prepare_data()
    return datamodule


def test_bf16_fit_gives_finite_float32_losses_and_a_float32_checkpoint(data, tmp_path):
    recorder = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True)
    trainer(tmp_path, "bf16-mixed", [recorder, checkpoints], max_steps=2, limit_val_batches=0).fit(tiny_cam(), data)
    assert len(recorder.losses) == 2
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in recorder.losses)
    state = read_weights_file(tmp_path / "checkpoints" / "last.ckpt", "checkpoint")["state_dict"]
    assert {value.dtype for value in state.values() if value.is_floating_point()} == {torch.float32}
    CAM(num_classes=3, backbone="resnet18", pretrained=None).load_state_dict(state)


def test_irn_loss_stays_finite_under_bf16_autocast():
    """1 + 1e-5 is 1 in bfloat16: IRN's -log(1 + 1e-5 - a) at a = 1 was -log(0), a nan loss at step 1 of the
    synthetic IRNet fit before lit_wsss.precision kept the loss in float32."""
    index = PathIndex(2, 6, 6)
    label = torch.zeros(6, 6, dtype=torch.long)
    label[:, 3:] = 1
    label[0, 0] = 255
    labels = {name: mask[None] for name, mask in affinity_labels(label, index, num_classes=2).items()}
    edge = torch.full((1, 1, 6, 6), -30.0, requires_grad=True)  # sigmoid -> 0, affinity 1 on every pair
    displacement = torch.zeros(1, 2, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = irn_loss(edge.bfloat16(), displacement.bfloat16(), labels, index)
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    reference = irn_loss(edge, displacement, labels, index)
    assert torch.allclose(losses["loss"], reference["loss"])
    losses["loss"].backward()
    assert torch.isfinite(edge.grad).all()


def test_random_walk_under_autocast_is_the_float32_walk():
    """Autocast sent the sparse products to a bfloat16 kernel that does not exist on the CPU (NotImplementedError:
    addmm_out_sparse_csr_impl_mkl); the walk now runs with autocast off, so it is the float32 walk exactly."""
    generator = torch.Generator().manual_seed(0)
    cams, boundary = torch.rand(2, 9, 11, generator=generator), torch.rand(9, 11, generator=generator)
    reference = {method: random_walk(cams, boundary, exp_times=3, method=method) for method in ("sparse", "dense")}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for method, expected in reference.items():
            walked = random_walk(cams.bfloat16(), boundary.bfloat16(), exp_times=3, method=method)
            assert walked.dtype == torch.float32
            assert torch.equal(walked, random_walk(cams.bfloat16().float(), boundary.bfloat16().float(),
                                                   exp_times=3, method=method))
            assert torch.allclose(walked, expected, atol=0.02)  # the inputs' own bfloat16 rounding only


def test_writers_store_bfloat16_as_float32():
    """``Tensor.numpy()`` refuses bfloat16: the writers' one conversion casts every floating array first."""
    array = _to_numpy(torch.tensor([0.25, 1.0], dtype=torch.bfloat16))
    assert array.dtype == np.float32 and array.tolist() == [0.25, 1.0]
    assert _to_numpy(torch.tensor([3])).dtype == np.int64


def test_bf16_cam_export_writes_float32_files_whose_masks_agree_with_fp32(data, tmp_path):
    """bfloat16 keeps 8 significant bits: through ResNet-18 the normalised CAMs move by up to 0.022 (measured
    on these 5 images, random weights). A pixel's mask changes only where its two best planes (a class or the
    0.15 background plane) are that close: 0.17 % of the pixels here. The bounds (CAMs within 0.05, masks
    agreeing on 98 %) leave twice the measured CAM drift and ten times the measured mask change."""
    model = tiny_cam()
    for precision in ("32-true", "bf16-mixed"):
        writer = CAMWriter(str(tmp_path / precision))
        trainer(tmp_path, precision, [writer]).predict(model, data, return_predictions=False)
    same = total = files = 0
    worst = 0.0
    for fp32_file in sorted((tmp_path / "32-true").glob("*.npz")):
        with np.load(fp32_file) as fp32, np.load(tmp_path / "bf16-mixed" / fp32_file.name) as bf16:
            assert bf16["high_res"].dtype == np.float32 and bf16["cam"].dtype == np.float32
            worst = max(worst, float(np.abs(bf16["high_res"] - fp32["high_res"]).max()))
            masks = [cams_to_mask(torch.from_numpy(f["high_res"]), torch.from_numpy(f["keys"])) for f in (fp32, bf16)]
        same += int((masks[0] == masks[1]).sum())
        total += masks[0].numel()
        files += 1
    print(f"bf16 vs fp32 CAMs: max |diff| {worst:.4f}, masks agree on {same / total:.4%} of {total} pixels")
    assert files == 5 and worst < 0.05
    assert same / total > 0.98, f"bf16 masks agree with fp32 on {same / total:.2%} of the pixels"


def test_channels_last_same_losses_cams_and_a_checkpoint_for_a_plain_model(data, tmp_path):
    model = tiny_cam()
    plain_losses = model.training_losses(batch := next(iter(data.train_dataloader())))
    checkpoints = ModelCheckpoint(dirpath=str(tmp_path / "checkpoints"), save_last=True)
    fit = trainer(tmp_path, callbacks=[ChannelsLast(), checkpoints], max_steps=1, limit_val_batches=0)
    fit.fit(model, data)
    # the callback converted the module at setup: NHWC weights, NHWC conv outputs from NCHW images
    assert model.classifier.weight.is_contiguous(memory_format=CHANNELS_LAST)
    image = torch.randn(1, 3, 64, 80)
    assert model.backbone(image)[-1].is_contiguous(memory_format=CHANNELS_LAST)
    # the checkpoint loads into a plain (NCHW) module with the same values
    fresh = CAM(num_classes=3, backbone="resnet18", pretrained=None, cam_scales=(1.0,))
    fresh.load_state_dict(read_weights_file(tmp_path / "checkpoints" / "last.ckpt", "checkpoint")["state_dict"])
    assert fresh.classifier.weight.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    # losses and CAMs: the same to float tolerance in either memory format
    reference = tiny_cam()
    nhwc_losses = tiny_cam().to(memory_format=CHANNELS_LAST).training_losses(batch)
    assert torch.allclose(plain_losses["cls"], reference.training_losses(batch)["cls"])
    assert torch.allclose(nhwc_losses["cls"], plain_losses["cls"], atol=1e-6)
    contiguous = trainer(tmp_path).predict(fresh, data)
    nhwc = trainer(tmp_path, callbacks=[ChannelsLast()]).predict(fresh, data)
    assert fresh.classifier.weight.is_contiguous(memory_format=CHANNELS_LAST)
    for batch_a, batch_b in zip(contiguous, nhwc, strict=True):
        for a, b in zip(batch_a, batch_b, strict=True):
            assert torch.equal(a["keys"], b["keys"])
            assert torch.allclose(a["high_res"], b["high_res"], atol=1e-5)
            assert torch.allclose(a["cam"], b["cam"], atol=1e-5)
