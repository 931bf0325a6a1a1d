"""The one CLI: every experiment file parses, and the real VOC path trains with fast_dev_run."""

import importlib
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lit_wsss.cli import main
from lit_wsss.stages import configs, method_files

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DATA_SETS = sorted(p.name for p in EXPERIMENTS.iterdir() if (p / "_base.yaml").is_file())
TRAINER_FILES = sorted((EXPERIMENTS / "trainer").glob("*.yaml"))
#: prediction stages and the method they are layered on
STAGE_FILES = {"predict_cams.yaml": "cam", "pseudo_labels.yaml": "irn", "segment.yaml": "deeplab"}
# Overlays (data-set variants) and the methods / overlays they are layered on; every other file is a method.
OVERLAYS = {"mini": ["cam"], "mini_cpu": ["cam", "mini"], "mini_irn": ["irn"],
            "cpu": ["cam"], "cpu_irn": ["irn"], "cpu_deeplab": ["deeplab"]}


def stems(folder: Path) -> set[str]:
    return {p.stem for p in folder.glob("[!_]*.yaml")}


#: every (data set, method or overlay): experiments/methods/ recipes on every data set, plus each data set's own
METHOD_FILES = [(d, m) for d in DATA_SETS for m in sorted((stems(EXPERIMENTS / "methods") | stems(EXPERIMENTS / d)))
                if m not in OVERLAYS or (EXPERIMENTS / d / f"{m}.yaml").is_file()]


def config_args(data: str, method: str) -> list[str]:
    """The CLI's layering (lit_wsss.stages.configs); an overlay comes after the method it is layered on."""
    if method in OVERLAYS:
        base, *more = OVERLAYS[method]
        return configs(data, base, [EXPERIMENTS / data / f"{name}.yaml" for name in (*more, method)])
    return configs(data, method)


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
        main(["fit", *config_args("voc", "cam"), "--config", str(trainer_file), "--print_config"])
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
    checked |= {Path(path) for data, method in METHOD_FILES for path in config_args(data, method)[1::2]}
    checked |= set(TRAINER_FILES) | {EXPERIMENTS / "stages" / name for name in STAGE_FILES}
    unchecked = sorted(str(p.relative_to(EXPERIMENTS)) for p in EXPERIMENTS.rglob("*.y*ml") if p not in checked)
    assert not unchecked, f"experiments/ files no CLI test parses (budgets belong in benchmarks/budgets/): {unchecked}"


def constructor_defaults(cls: type) -> dict:
    """Keyword defaults of ``cls`` and of the classes its ``**kwargs`` reach (the MRO's ``__init__``s)."""
    defaults: dict = {}
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            for param in inspect.signature(klass.__init__).parameters.values():
                if param.default is not param.empty:
                    defaults.setdefault(param.name, param.default)
    return defaults


@pytest.mark.parametrize("path", sorted((EXPERIMENTS / "methods").glob("*.yaml")), ids=lambda p: p.stem)
def test_method_files_state_only_what_differs_from_the_defaults(path):
    """Issue 15 part 4: a recipe in experiments/methods/ restates no constructor default of its model."""
    model = yaml.safe_load(path.read_text())["model"]
    module, name = model["class_path"].rsplit(".", 1)
    defaults = constructor_defaults(getattr(importlib.import_module(module), name))
    restated = {key: value for key, value in (model.get("init_args") or {}).items()
                if key in defaults and value is not None and value == (list(defaults[key])
                                                                       if isinstance(defaults[key], tuple) else defaults[key])}
    assert not restated, f"{path.name} restates defaults of {name}: {restated}"


def test_method_layering_and_unknown_method():
    """The data set's file comes after the method's recipe; a method with neither file is an error naming both."""
    assert method_files("synth", "cam") == [EXPERIMENTS / "methods" / "cam.yaml", EXPERIMENTS / "synth" / "cam.yaml"]
    assert method_files("voc", "cam") == [EXPERIMENTS / "methods" / "cam.yaml"]
    assert method_files("coco", "irn") == []
    with pytest.raises(FileNotFoundError, match=r"methods/nope\.yaml.*voc/nope\.yaml"):
        configs("voc", "nope")


def test_voc_mini_fast_dev_run(shared_data, tmp_path):
    """Real VOC images and official masks through the experiments/voc files (resnet18, random init, CPU)."""
    mini = shared_data / "voc12-mini"
    main([
        "fit", *config_args("voc", "mini"),
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
        main(["fit", *config_args("voc", "cam"), "--model.init_args.no_such_option", "1"])
    assert exit_info.value.code != 0
    assert "no_such_option" in capsys.readouterr().err


def test_synthetic_fit_writes_a_checkpoint_with_its_protocol(tmp_path):
    """The built-in data path end to end: generate, train 2 steps, validate, checkpoint with protocol."""
    main([
        "fit", *config_args("synth", "cam"),
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
    assert 0 <= checkpoint["callbacks"][next(k for k in checkpoint["callbacks"] if "val/mIoU" in k)][
        "best_model_score"] <= 1
    assert any(k.startswith("RNGState") for k in checkpoint["callbacks"])  # WSSSModule.configure_callbacks


def test_voc_mini_predict_then_eval_cam(shared_data, tmp_path):
    """`lit-wsss predict` (CAM files) then `lit-wsss eval-cam` on real VOC images and official masks."""
    mini = shared_data / "voc12-mini"
    cams = tmp_path / "cams"
    main([
        "predict", *config_args("voc", "mini"), "--config", str(EXPERIMENTS / "stages" / "predict_cams.yaml"),
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
