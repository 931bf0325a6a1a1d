"""bf16-mixed and channels_last as options of fit and predict (issue 18), checked on the CPU; the same stages on a
GPU are in tests/test_gpu.py."""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lit_wsss.callbacks import CAMWriter, ChannelsLast
from lit_wsss.cam_files import DEFAULT_BG_THRESHOLD, cam_path, read_cam_file
from lit_wsss.modules import CAM

from test_writers import make_datamodule


def export(tmp_path, name, model, **trainer_options):
    out = tmp_path / name
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, callbacks=[*trainer_options.pop("callbacks", []), CAMWriter(str(out))],
                         **trainer_options)
    trainer.predict(model, make_datamodule(tmp_path / "synthetic"), return_predictions=False)
    ids = sorted(json.loads((out / "manifest.json").read_text())["images"])
    return {i: read_cam_file(cam_path(out, i), ("keys", "high_res", "cam")) for i in ids}


def masks(cams):
    return {i: np.where(c["high_res"].max(0, initial=0) > DEFAULT_BG_THRESHOLD, c["high_res"].argmax(0) + 1, 0)
            for i, c in cams.items()}


def model():
    torch.manual_seed(0)
    return CAM(num_classes=3, backbone="resnet18", pretrained=None, cam_scales=(1.0, 0.5))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bf16_mixed_trains_and_exports_float32_cams(tmp_path):
    trained = model()
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                         enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    data = make_datamodule(tmp_path / "synthetic")
    data.batch_size = 2
    trainer.fit(trained, data)
    assert trainer.global_step == 2
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in trained.parameters())
    trainer.save_checkpoint(tmp_path / "bf16.ckpt")
    state = torch.load(tmp_path / "bf16.ckpt", weights_only=True)["state_dict"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())  # mixed: float32 master weights
    half = export(tmp_path, "bf16", trained, precision="bf16-mixed")
    full = export(tmp_path, "fp32", trained)
    assert all(c["high_res"].dtype == np.float32 and c["cam"].dtype == np.float32 for c in half.values())
    agree = [np.mean(a == b) for a, b in zip(masks(half).values(), masks(full).values(), strict=True)]
    # bf16 keeps 8 bits of mantissa: CAMs move by ~1 %, which flips only pixels near the 0.15 plane or a tie
    assert min(agree) > 0.9 and np.mean(agree) > 0.95, agree


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_channels_last_gives_the_same_cams_and_a_plain_checkpoint(tmp_path):
    plain = export(tmp_path, "plain", model())
    converted = model()
    last = export(tmp_path, "channels_last", converted, callbacks=[ChannelsLast()])
    assert converted.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    for image_id, cams in plain.items():
        for name in ("high_res", "cam"):
            np.testing.assert_allclose(last[image_id][name], cams[name], rtol=0, atol=1e-4)
    fresh = model()
    fresh.load_state_dict(converted.state_dict())
    assert fresh.backbone.conv1.weight.is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), converted.state_dict().values(),
                                                 strict=True))
