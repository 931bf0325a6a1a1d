"""CAM dump: atomic, resumable, byte-reproducible files; exactly once under DDP (issue 3, style.md P7)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lit_wsss.callbacks import CAMWriter
from lit_wsss.cli import main
from lit_wsss.datamodules import SyntheticVOCDataModule
from lit_wsss.modules import CAM
from lit_wsss.stages import configs

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def predict_command(data_root: Path, out_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "lit_wsss", "predict",
        *configs("synth", "cam"),
        "--config", str(EXPERIMENTS / "stages" / "predict_cams.yaml"),
        f"--data.init_args.root={data_root}", "--data.init_args.num_train=4", "--data.init_args.num_val=24",
        "--data.init_args.num_workers=0",
        "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=null",
        f"--trainer.callbacks.init_args.out_dir={out_dir}", "--trainer.enable_progress_bar=false",
    ]


def run_env() -> dict[str, str]:
    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
            "PYTHONWARNINGS": "ignore"}


def test_killed_dump_resumes_to_byte_identical_files(tmp_path, capfd, monkeypatch):
    """kill -9 in the middle of an export, then the same command: every file as in an uninterrupted export.
    Issue 17: while the first export runs, a second one into its folder is refused, naming it (it would delete
    the first one's temporary files as leftovers of a killed run and write a manifest of the ids it saw)."""
    data = tmp_path / "synthetic"
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    subprocess.run(predict_command(data, reference), check=True, env=run_env(), capture_output=True)
    process = subprocess.Popen(predict_command(data, resumed), env=run_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(resumed.glob("*.npz")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        monkeypatch.setattr(sys, "argv", ["lit-wsss"])
        with pytest.raises(SystemExit) as second:  # in this process: no second start-up to wait for
            main(predict_command(data, resumed)[3:])
        assert process.poll() is None, "the refusal must come while the first export runs"
        while len(list(resumed.glob("*.npz"))) < 3 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert second.value.code == 1
    line = next(line for line in capfd.readouterr().err.splitlines() if "error" in line)
    assert line.startswith(f"lit-wsss: error: cams folder {resumed} is being written by another process "
                           f"(pid {process.pid} on ")
    partial = len(list(resumed.glob("2000_*.npz")))
    assert 0 < partial < 24, "the kill must land in the middle of the dump"
    assert not (resumed / "manifest.json").exists()
    subprocess.run(predict_command(data, resumed), check=True, env=run_env(), capture_output=True)
    names = sorted(p.name for p in reference.glob("*.npz"))
    assert len(names) == 24 and names == sorted(p.name for p in resumed.glob("*.npz"))
    for name in names:
        assert (reference / name).read_bytes() == (resumed / name).read_bytes(), name
    assert not [p for p in resumed.iterdir() if p.name.endswith(".tmp") or p.name.startswith("_shard_")]
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["count"] == 24 and manifest["written_this_run"] == 24 - partial
    assert manifest["bg_threshold"] == 0.15 and manifest["producer"] == "CAM"
    with np.load(resumed / names[0], allow_pickle=False) as cams:
        keys, high_res, cam = cams["keys"], cams["high_res"], cams["cam"]
    assert keys.dtype == np.int64 and high_res.dtype == np.float32 and high_res.shape[0] == len(keys)
    assert cam.shape[1:] == tuple(-(-s // 4) for s in high_res.shape[1:])
    assert manifest["images"][names[0][:-4]]["size"] == list(high_res.shape[1:])
    # and the dump evaluates through the console script, ground truth from the synthetic VOC layout
    result_file = tmp_path / "eval" / "synthetic.json"
    subprocess.run([sys.executable, "-m", "lit_wsss", "eval-cam", "--cams", str(resumed), "--root", str(data),
                    "--list", "val", "--num-classes", "4", "--out", str(result_file), "--no-progress"],
                   check=True, env=run_env(), capture_output=True)
    result = json.loads(result_file.read_text())
    assert result["num_images"] == 24 and len(result["thresholds"]) == 21


def make_datamodule(root, **overrides):
    """A 4 + 5 image synthetic set of 64 x 80 images (also used by test_precision.py); ``overrides`` go to the
    DataModule (batch size, crop)."""
    return SyntheticVOCDataModule(**{"root": str(root), "num_classes": 3, "num_train": 4, "num_val": 5,
                                     "image_size": (64, 80), "context_class": 0, "generator_seed": 2,
                                     "num_workers": 0, **overrides})


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_two_process_predict_writes_each_id_exactly_once(tmp_path):
    torch.manual_seed(0)
    model = CAM(num_classes=3, backbone="resnet18", pretrained=None, cam_scales=(1.0,))
    out = tmp_path / "cams"
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                         enable_progress_bar=False, callbacks=[CAMWriter(str(out))])
    trainer.predict(model, make_datamodule(tmp_path / "synthetic"), return_predictions=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 5 and manifest["world_size"] == 2
    assert manifest["written_by_rank"] == {"0": 3, "1": 2}  # unrepeated sampler: 5 ids over 2 ranks
    ids = sorted(p.stem for p in out.glob("*.npz"))
    assert ids == sorted(manifest["images"]) and len(ids) == 5
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}.npz" for i in ids] + ["manifest.json", "run.json"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_another_producer_is_refused(tmp_path):
    out = tmp_path / "cams"

    def predict(lr):
        torch.manual_seed(0)
        model = CAM(num_classes=3, backbone="resnet18", pretrained=None, cam_scales=(1.0,), lr=lr)
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             callbacks=[CAMWriter(str(out))])
        trainer.predict(model, make_datamodule(tmp_path / "synthetic"), return_predictions=False)

    predict(0.1)
    predict(0.1)  # same producer: resumes (nothing left to do)
    with pytest.raises(RuntimeError, match="another producer"):
        predict(0.2)
