"""The one CLI: every experiment file parses, and the real VOC path trains with fast_dev_run."""

import json
import sys
from pathlib import Path

import pytest
import torch

from lit_wsss.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DATA_SETS = sorted(p.name for p in EXPERIMENTS.iterdir() if (p / "_base.yaml").is_file())
METHOD_FILES = [(d, f.name) for d in DATA_SETS for f in sorted((EXPERIMENTS / d).glob("[!_]*.yaml"))]
TRAINER_FILES = sorted((EXPERIMENTS / "trainer").glob("*.yaml"))
#: prediction stages and the method file they are layered on
STAGE_FILES = {"predict_cams.yaml": "cam.yaml", "pseudo_labels.yaml": "irn.yaml", "segment.yaml": "deeplab.yaml"}


# Overlays (data-set variants) and the files they are layered on; every other file is a method.
OVERLAYS = {"mini.yaml": ["cam.yaml"], "mini_cpu.yaml": ["cam.yaml", "mini.yaml"], "mini_irn.yaml": ["irn.yaml"]}


def config_args(data: str, method: str) -> list[str]:
    files = ["_base.yaml", *OVERLAYS.get(method, []), method]
    return [arg for name in files for arg in ("--config", str(EXPERIMENTS / data / name))]


def csv_logger(save_dir) -> str:
    """Replace the experiment files' logger list (CSV + offline W&B) by a CSV logger under ``save_dir``."""
    return '--trainer.logger=[{"class_path": "pytorch_lightning.loggers.CSVLogger", ' \
        f'"init_args": {{"save_dir": "{save_dir}", "name": "cam"}}}}]'


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])  # LightningCLI warns about pytest's own arguments


@pytest.mark.parametrize("data,method", METHOD_FILES)
def test_print_config(data, method, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args(data, method), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "class_path: lit_wsss.modules." in printed and "class_path: lit_wsss.datamodules." in printed


@pytest.mark.parametrize("trainer_file", TRAINER_FILES, ids=lambda p: p.name)
def test_print_config_trainer_overlays(trainer_file, capsys):
    with pytest.raises(SystemExit):
        main(["fit", *config_args("voc", "cam.yaml"), "--config", str(trainer_file), "--print_config"])
    assert "strategy" in capsys.readouterr().out


@pytest.mark.parametrize("stage_file", sorted(STAGE_FILES))
def test_print_config_stage_overlays(stage_file, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *config_args("voc", STAGE_FILES[stage_file]), "--config",
              str(EXPERIMENTS / "stages" / stage_file), "--print_config"])
    assert exit_info.value.code in (None, 0)
    assert "lit_wsss.callbacks." in capsys.readouterr().out


def test_every_experiment_file_is_a_config_of_the_cli():
    """Every YAML under experiments/ is checked by one of the --print_config tests above (issue 13: a file there
    that the CLI refuses, like a benchmark budget, is a trap for `lit-wsss fit --config`)."""
    checked = {EXPERIMENTS / data / "_base.yaml" for data in DATA_SETS}
    checked |= {EXPERIMENTS / data / name for data, name in METHOD_FILES}
    checked |= set(TRAINER_FILES) | {EXPERIMENTS / "stages" / name for name in STAGE_FILES}
    unchecked = sorted(str(p.relative_to(EXPERIMENTS)) for p in EXPERIMENTS.rglob("*.y*ml") if p not in checked)
    assert not unchecked, f"experiments/ files no CLI test parses (budgets belong in benchmarks/budgets/): {unchecked}"


def test_voc_mini_fast_dev_run(shared_data, tmp_path):
    """Real VOC images and official masks through the experiments/voc files (resnet18, random init, CPU)."""
    mini = shared_data / "voc12-mini"
    main([
        "fit", *config_args("voc", "mini.yaml"),
        "--data.init_args.root", str(mini),
        "--data.init_args.train_list", str(mini / "val.txt"),
        "--data.init_args.val_list", str(mini / "train.txt"),
        "--data.init_args.cls_labels", str(shared_data / "voc12" / "cls_labels.npy"),
        "--data.init_args.crop_size", "128",
        "--model.init_args.backbone", "resnet18",
        "--model.init_args.pretrained", "null",
        "--model.init_args.cam_scales", "[1.0, 0.5]",
        "--trainer.fast_dev_run", "true",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path),
    ])


def test_bad_config_key_is_reported(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args("voc", "cam.yaml"), "--model.init_args.no_such_option", "1"])
    assert exit_info.value.code != 0
    assert "no_such_option" in capsys.readouterr().err


def test_synthetic_fit_writes_a_checkpoint_with_its_protocol(tmp_path):
    """The built-in data path end to end: generate, train 2 steps, validate, checkpoint with protocol."""
    main([
        "fit", *config_args("synth", "cam.yaml"),
        f"--data.init_args.root={tmp_path / 'synthetic'}",
        "--data.init_args.num_train=8", "--data.init_args.num_val=2", "--data.init_args.batch_size=4",
        "--data.init_args.num_workers=0", "--data.init_args.crop_size=64",
        "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=null",
        "--trainer.max_steps=2", "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}", csv_logger(tmp_path),
    ])
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    protocol = checkpoint["protocol"]
    assert protocol["method"] == "CAM" and protocol["backbone_weights"] == "random-init"
    assert protocol["world_size"] == 1 and protocol["effective_batch_size"] == 4 and protocol["seed"] == 0
    assert protocol["data"]["val_list"] == "val" and protocol["data"]["ground_truth"] == "SegmentationClass"
    assert protocol["cam"]["scales"] == [1.0, 0.5, 1.5, 2.0] and protocol["cam"]["threshold_chosen"] == "fixed"
    assert protocol["optimizer"]["effective_momentum"] == 1e-4
    assert 0 <= checkpoint["callbacks"][next(k for k in checkpoint["callbacks"] if "ModelCheckpoint" in k)][
        "best_model_score"] <= 1


def test_voc_mini_predict_then_eval_cam(shared_data, tmp_path):
    """`lit-wsss predict` (CAM files) then `lit-wsss eval-cam` on real VOC images and official masks."""
    mini = shared_data / "voc12-mini"
    cams = tmp_path / "cams"
    main([
        "predict", *config_args("voc", "mini.yaml"), "--config", str(EXPERIMENTS / "stages" / "predict_cams.yaml"),
        "--data.init_args.root", str(mini),
        "--data.init_args.predict_list", str(mini / "train.txt"),
        "--data.init_args.cls_labels", str(shared_data / "voc12" / "cls_labels.npy"),
        "--model.init_args.backbone", "resnet18", "--model.init_args.pretrained", "null",
        "--model.init_args.cam_scales", "[1.0, 0.5]", "--trainer.accelerator", "cpu",
        f"--trainer.callbacks.init_args.out_dir={cams}",
    ])
    assert sorted(p.stem for p in cams.glob("*.npz")) == sorted((mini / "train.txt").read_text().split())
    out = tmp_path / "eval" / "result.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval-cam", "--cams", str(cams), "--root", str(mini), "--list", str(mini / "train.txt"),
              "--thresholds", "0.0:0.6:0.03", "--out", str(out), "--no-progress"])
    assert exit_info.value.code == 0
    result = json.loads(out.read_text())
    assert len(result["thresholds"]) == 21 and result["num_images"] == 4
    assert result["fixed"]["threshold"] == 0.15 and result["fixed"]["chosen"] == "fixed"
    assert result["best"]["miou"] >= result["fixed"]["miou"]
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()
