"""W&B offline run: CAM panel images, the per-class IoU table and the sweep curve are in the run directory,
and the same figures are saved as files (issue 3)."""

import json
import sys

import pytest

from lit_wsss.cli import main
from lit_wsss.stages import configs



@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize("method", ["cam", "sipe", "deeplab"])
def test_offline_wandb_run_holds_panel_table_and_curve(method, tmp_path, monkeypatch):
    """SIPE (its own background, no threshold sweep) and the segmentation network (its class probabilities in
    the panel, image / prediction / ground-truth layers) get the panel and the mask layers, no table or curve."""
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    logger = [{"class_path": "pytorch_lightning.loggers.WandbLogger",
               "init_args": {"save_dir": str(tmp_path), "project": "lit_wsss_test", "offline": True}}]
    import wandb

    try:
        run_fit(method, tmp_path, logger)
    finally:
        wandb.finish()  # a run left open would be reused by the next test's WandbLogger
    check_run(method, tmp_path)


def run_fit(method, tmp_path, logger):
    root = tmp_path / "synthetic"
    if method == "deeplab":  # trained on the set's own masks (generated first: seed_dir is checked at setup)
        from lit_wsss.datamodules.synthetic import generate_synthetic_voc

        generate_synthetic_voc(root, num_train=8, num_val=3)
        specific = [f"--data.init_args.seed_dir={root / 'SegmentationClass'}", "--model.init_args.output_stride=16",
                    "--model.init_args.inference_scales=[1.0]"]
    else:
        specific = ["--model.init_args.cam_scales=[1.0]"]
    main([
        "fit", *configs("synth", f"{method}"),
        f"--data.init_args.root={root}", "--data.init_args.num_train=8",
        "--data.init_args.num_val=3", "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
        "--data.init_args.crop_size=64", "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=null",
        *specific, "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=" + json.dumps(logger),
    ])


def check_run(method, tmp_path):
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    images = [p.name for p in (media / "images").rglob("*.png")]
    assert any(name.startswith("cam_panel") for name in images), images
    assert sum(name.startswith("masks") and not name.endswith(".mask.png") for name in images) == 3
    mask_layers = list((media / "images").rglob("*.mask.png"))
    assert len(mask_layers) == 6  # prediction + ground truth for each of the 3 panel images
    saved = {p.name for p in tmp_path.rglob("epoch_000/*")}
    if method in ("sipe", "deeplab"):
        assert not any(name.startswith("sweep_curve") for name in images) and saved == {"cam_panel.png"}
        return
    assert any(name.startswith("sweep_curve") for name in images), images
    tables = list((media / "table").rglob("iou_table*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert [row[0] for row in table["data"]] == ["background", "aeroplane", "bicycle", "bird", "boat"]
    # the same figures as files, for users without W&B
    assert {"cam_panel.png", "sweep_curve.png", "iou_table.md"} <= saved
