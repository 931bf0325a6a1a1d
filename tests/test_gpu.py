"""Every stage on one CUDA device under bf16-mixed (issue 18): fit a CAM method, CAM export, IRNet fit + random
walk, segmentation fit + predict, on a small synthetic set (well under a minute each on one GPU).

Skipped without a CUDA device; ``make test`` deselects the ``gpu`` marker. Run with
``.venv/bin/python -m pytest -m gpu tests/test_gpu.py`` (``benchmarks/gpu_check.sh`` does). The stages share
module-scoped fixtures, so each test needs the ones before it and a test run alone builds them.
"""

import json
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from test_writers import make_datamodule

from lit_wsss.callbacks import ChannelsLast
from lit_wsss.checkpoints import read_weights_file
from lit_wsss.datamodules.synthetic import generate_synthetic_voc
from lit_wsss.modules import CAM
from lit_wsss.stages import (EXPERIMENTS, configs, evaluate, evaluate_segmentation, export_cams, fit, ir_labels,
                             predict, segment)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device: torch.cuda.is_available() is False on this machine"),
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning"),
]

GPU = ["--trainer.accelerator=gpu", "--trainer.devices=1", "--trainer.precision=bf16-mixed",
       "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
STEPS = ["--trainer.max_steps=20", "--trainer.max_epochs=-1", "--trainer.limit_val_batches=2"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The synthetic set (32 training, 8 held-out images) and the folder of the stages' outputs."""
    out = tmp_path_factory.mktemp("gpu")
    root = generate_synthetic_voc(out / "synthetic", num_train=32, num_val=8, seed=0)
    data = [f"--data.init_args.root={root}", "--data.init_args.num_workers=2", "--data.init_args.batch_size=8"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["lit-wsss"])  # LightningCLI warns about pytest's own arguments
        yield {"root": root, "out": out, "data": data,
               "cam": [*configs("synth", "cam"), *data, "--data.init_args.num_train=32", "--data.init_args.num_val=8",
                       *GPU]}


@pytest.fixture(scope="module")
def cam_checkpoint(chain):
    return fit([*chain["cam"], *STEPS], chain["out"] / "cam")


@pytest.fixture(scope="module")
def cams(chain, cam_checkpoint):
    folder = chain["out"] / "cams"
    export_cams(chain["cam"], cam_checkpoint, "train", folder)
    return folder


@pytest.fixture(scope="module")
def pseudo_labels(chain, cams):
    ir_dir, folder = chain["out"] / "ir_labels", chain["out"] / "pseudo_labels"
    ir_labels(cams, chain["root"], "train", ir_dir, workers=2)
    irn = [*configs("synth", "irn"), *chain["data"], f"--data.init_args.ir_label_dir={ir_dir}",
           f"--data.init_args.cam_dir={cams}", *GPU, "--trainer.max_steps=10", "--trainer.max_epochs=-1"]
    checkpoint = fit(irn, chain["out"] / "irn")
    predict([*irn, "--config", str(EXPERIMENTS / "stages" / "pseudo_labels.yaml"), f"--ckpt_path={checkpoint}"], folder)
    return folder


def test_fit_cam_method_bf16_on_the_gpu(cam_checkpoint):
    state = read_weights_file(cam_checkpoint, "checkpoint")["state_dict"]
    floats = [value for value in state.values() if value.is_floating_point()]
    assert {value.dtype for value in floats} == {torch.float32}  # bf16-mixed keeps float32 master weights
    assert all(torch.isfinite(value).all() for value in floats)


def test_cam_export_bf16_on_the_gpu(chain, cams):
    files = sorted(cams.glob("*.npz"))
    assert len(files) == 32
    with np.load(files[0], allow_pickle=False) as record:
        assert record["high_res"].dtype == np.float32 and np.isfinite(record["high_res"]).all()
    assert json.loads((cams / "manifest.json").read_text())["count"] == 32
    result = evaluate(cams, chain["root"], "train", chain["out"] / "eval_cams.json", num_classes=4)
    assert result["num_images"] == 32


def test_irn_fit_and_random_walk_on_the_gpu(chain, pseudo_labels):
    assert len(list(pseudo_labels.glob("*.png"))) == 32
    result = evaluate(pseudo_labels, chain["root"], "train", chain["out"] / "eval_pseudo.json", num_classes=4)
    assert result["num_images"] == 32


def test_segmentation_fit_and_predict_on_the_gpu(chain, pseudo_labels):
    seg = [*configs("synth", "deeplab"), *chain["data"], "--data.init_args.num_train=32", "--data.init_args.num_val=8",
           f"--data.init_args.seed_dir={pseudo_labels}", *GPU, *STEPS]
    checkpoint = fit(seg, chain["out"] / "deeplab")
    folder = chain["out"] / "segmentation"
    segment(seg, checkpoint, "val", folder)
    assert len(list(folder.glob("*.png"))) == 8
    result = evaluate_segmentation(folder, chain["root"], "val", chain["out"] / "eval_seg.json", num_classes=4)
    assert result["num_images"] == 8


def test_channels_last_cams_on_the_gpu_equal_contiguous(chain):
    """NHWC on the device (cuDNN picks other kernels): the same CAMs to bf16 tolerance, NHWC conv outputs."""
    torch.manual_seed(0)
    model = CAM(num_classes=3, backbone="resnet18", pretrained=None, cam_scales=(1.0,))
    data = make_datamodule(chain["out"] / "tiny")

    def cams(callbacks):
        trainer = pl.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", logger=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        return [record for batch in trainer.predict(model, data) for record in batch]

    contiguous, nhwc = cams([]), cams([ChannelsLast()])
    assert model.classifier.weight.is_contiguous(memory_format=torch.channels_last)
    image = torch.randn(1, 3, 64, 80, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model.cuda().backbone(image)[-1].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(contiguous, nhwc, strict=True):
        assert torch.allclose(a["high_res"], b["high_res"], atol=0.05)
