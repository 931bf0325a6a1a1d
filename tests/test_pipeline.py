"""`lit-wsss pipeline` end to end on a tiny synthetic set: every stage runs, reads its predecessor's manifest,
and reports CAM, pseudo-label and (held-out) segmentation mIoU."""

import json
import sys

import pytest

from lit_wsss.datamodules.synthetic import generate_synthetic_voc
from lit_wsss.pipeline import main

TINY_DATA = "--data.init_args.num_train=8 --data.init_args.num_val=4 --data.init_args.generator_seed=7"
TINY_SEGMENTATION = ("--model.init_args.backbone=resnet18 --model.init_args.pretrained=null "
                     "--model.init_args.output_stride=16 --model.init_args.inference_scales=[1.0] "
                     "--data.init_args.crop_size=64 --trainer.max_steps=2")


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
# cam, sipe (its own background), slams (a pre-stage) and gslm (rounds) cover the wiring; cpn and vwe add none.
# slams and gslm are slow-marked for time (test_slams.py::test_cli_two_stages runs slams' pre-stage and
# test_gslm.py::test_rounds_driver the rounds; `make test-all` runs every case).
@pytest.mark.parametrize("method", ["cam", "sipe",
                                    *(pytest.param(m, marks=pytest.mark.slow) for m in ("slams", "gslm", "cpn",
                                                                                       "vwe"))])
def test_pipeline_runs_every_stage(method, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    root = generate_synthetic_voc(tmp_path / "synthetic", num_train=8, num_val=4, seed=7)
    data = f"--data.init_args.root={root} --data.init_args.num_workers=0 --data.init_args.batch_size=4"
    common = "--model.init_args.backbone=resnet18 --model.init_args.pretrained=null --trainer.max_steps=2"
    code = main([
        "--data", "synth", "--method", method, "--root", str(root), "--list", "train",
        "--out", str(tmp_path / "run"), "--workers", "1",
        "--cam-args", f"{data} {TINY_DATA} --data.init_args.crop_size=64 {common} "
                      "--model.init_args.cam_scales=[1.0] --trainer.limit_val_batches=1"
                      + (" --model.init_args.encoder_backbone=resnet18 --model.init_args.se_size=32"
                         if method == "slams" else ""),
        "--irn-args", f"{data} --data.init_args.crop_size=96 --model.init_args.crop_size=96 {common}",
        # SLAMs: stage A first (experiments/methods/slams_encoder.yaml + synth/slams_encoder.yaml), its checkpoint passed to stage B
        "--encoder-args", f"{data} --data.init_args.num_train=8 --data.init_args.num_val=4 "
                          f"--data.init_args.generator_seed=7 --data.init_args.crop_size=64 {common} "
                          "--model.init_args.se_size=32 --trainer.limit_val_batches=1",
        # GSLM: one SLM round after the GLM, its pooling head sized for the 4 x 4 maps of 64-px crops
        "--gslm-rounds", "1", "--slm-args", "--model.init_args.pool_size=4 ",
        "--seg-args", f"{data} {TINY_DATA} {TINY_SEGMENTATION}",
        # SIPE's IR labels are streamed from its CAM export (its own background through CAMWriter(ir_labels))
        *(["--stream-ir-labels"] if method == "sipe" else []),
    ])
    assert code == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("pipeline |")]
    stages = [line.split("|")[1].split(":")[1].strip() for line in printed]
    cam_stages = ["GSLM rounds"] if method == "gslm" else ["train CAM", "CAMs"]
    assert stages == ["train encoder"] * (method == "slams") + cam_stages + [
        "eval CAMs", "IR labels", "train IRNet", "pseudo labels", "eval pseudo labels",
        "train segmentation", "segment", "eval segmentation"]
    summary = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert "mIoU" in summary[-8] and "mIoU" in summary[-4] and "held-out val" in summary[-1]["mIoU"]
    assert json.loads((tmp_path / "run" / "eval_cams.json").read_text())["num_classes"] == 4  # from the manifest
    run = tmp_path / "run"
    assert len(list((run / "pseudo_labels").glob("*.png"))) == 8
    ir_manifest = json.loads((run / "ir_labels" / "manifest.json").read_text())
    pseudo_manifest = json.loads((run / "pseudo_labels" / "manifest.json").read_text())
    assert ir_manifest["count"] == 8 and pseudo_manifest["count"] == 8 and pseudo_manifest["bg_threshold"] == 0.25
    # the segmentation network trained on the pseudo labels of train and was scored on the 4 held-out val images
    seg_manifest = json.loads((run / "segmentation" / "manifest.json").read_text())
    assert seg_manifest["count"] == 4 and seg_manifest["producer"] == "DeepLab"
    assert seg_manifest["protocol"]["data"]["seed_dir"] == str(run / "pseudo_labels")
    assert json.loads((run / "eval_segmentation.json").read_text())["num_images"] == 4
    assert pseudo_manifest["protocol"]["data"]["cams_producer"]["stage"] == "cams"
    if method == "gslm":  # the IRN stages start from the last SLM round's CAMs
        assert pseudo_manifest["protocol"]["data"]["cams_producer"]["producer"] == "GSLM"
        # --list is GSLM's training list here: the CAMs scored after round 0 are exported once, as round 1's
        assert pseudo_manifest["protocol"]["data"]["cam_dir"].endswith("gslm/round1/cams")
    assert pseudo_manifest["protocol"]["data"]["ir_labels_producer"]["stage"] == "ir-labels"
    # the background convention travels from the CAM manifest: SIPE's own bg through IR labels and the walk
    explicit = method == "sipe"
    assert ir_manifest["convention"] == ("explicit" if explicit else "constant")
    # streamed (sipe): the CAM export wrote every IR label, the IR-label stage found them finished
    streamed = method == "sipe"
    assert ir_manifest["written_this_run"] == (0 if streamed else 8)
    if method != "gslm":  # GSLM's CAMs are its last round's
        cams_manifest = json.loads((run / "cams" / "manifest.json").read_text())
        assert cams_manifest.get("ir_labels") == (str(run / "ir_labels") if streamed else None)
    pseudo = json.loads((run / "eval_pseudo_labels.json").read_text())
    assert pseudo["mode"] == ("bg_argmax" if explicit else "sweep")


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_ground_truth_upper_bound_trains_on_the_masks(tmp_path, monkeypatch, capsys):
    """`--method ground_truth`: no WSSS stage, the segmentation network on the masks of --list, scored on val."""
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    root = generate_synthetic_voc(tmp_path / "synthetic", num_train=8, num_val=4, seed=7)
    data = f"--data.init_args.root={root} --data.init_args.num_workers=0 --data.init_args.batch_size=4"
    run = tmp_path / "run"
    assert main(["--data", "synth", "--method", "ground_truth", "--root", str(root), "--list", "train",
                 "--out", str(run), "--seg-args", f"{data} {TINY_DATA} {TINY_SEGMENTATION}"]) == 0
    assert [s["stage"] for s in json.loads((run / "pipeline.json").read_text())] == [
        "train segmentation", "segment", "eval segmentation"]
    manifest = json.loads((run / "segmentation" / "manifest.json").read_text())
    assert manifest["protocol"]["data"]["seed_dir"] == str(root / "SegmentationClass")
    with pytest.raises(SystemExit):  # scored on its own training images: refused before anything runs
        main(["--data", "synth", "--method", "ground_truth", "--root", str(root), "--list", "val",
              "--out", str(tmp_path / "leak"), "--seg-args", data])
    assert not (tmp_path / "leak").exists() and "held-out" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a method without a config file: refused, naming the files it looked for
        main(["--data", "synth", "--method", "nope", "--root", str(root), "--list", "train",
              "--out", str(tmp_path / "nope")])
    assert not (tmp_path / "nope").exists() and "methods/nope.yaml" in capsys.readouterr().err


def test_an_interrupted_training_resumes_and_a_finished_one_is_skipped(tmp_path, monkeypatch):
    """last.ckpt is written after every epoch: only the marker of a finished fit makes a rerun skip it."""
    from types import SimpleNamespace

    import lit_wsss.cli
    from lit_wsss import stages

    calls = []

    def fake_run_cli(argv):
        calls.append(argv)
        return SimpleNamespace(trainer=SimpleNamespace(fast_dev_run=False, global_step=7))

    monkeypatch.setattr(lit_wsss.cli, "run_cli", fake_run_cli)
    run = tmp_path / "cam"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"epoch 2 of 5")  # a killed run left this
    assert stages.fit(["--config", "x.yaml"], run) == run / "checkpoints" / "last.ckpt"
    assert calls[-1][-1] == f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    assert json.loads((run / stages.FIT_DONE).read_text()) == {
        "checkpoint": str(run / "checkpoints" / "last.ckpt"), "global_step": 7, "resumed": True}
    stages.fit(["--config", "x.yaml"], run)
    assert len(calls) == 1  # finished: not trained again
