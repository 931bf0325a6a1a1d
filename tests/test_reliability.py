"""Issue 17: bad input and faults stop with a message that names the file, the key or the step, exit non-zero and
leave no partial or non-finite output behind (docs/reliability.md lists every case tried)."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from lit_wsss.cam_files import write_cam_file
from lit_wsss.cli import main
from lit_wsss.datamodules.files import jpeg_is_truncated, read_rgb
from lit_wsss.errors import ImageFileError, NonFiniteError, own_message, report
from lit_wsss.evaluation import main as eval_cam_main
from lit_wsss.io import palette_png_bytes
from lit_wsss.modules import CAM
from lit_wsss.stages import configs

CLASSES = ["sky thing", "ground thing"]
#: resnet18 without weights on 48 px crops of a 4-image folder, no logger or callbacks: the CLI end to end in seconds
TINY = ["--data.init_args.crop_size", "48", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
        "--model.init_args.backbone", "resnet18", "--model.init_args.pretrained", "null",
        "--model.init_args.cam_scales", "[1.0]", "--trainer.accelerator", "cpu", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks=[]"]


@pytest.fixture
def folder(tmp_path):
    """A folder data set: JPEGs a, b (train) and c, d (val) of 40 x 60, masks, two classes."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for name in "abcd":
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "images" / f"{name}.jpg")
        mask = np.zeros((40, 60), np.uint8)
        mask[:10], mask[30:] = 1, 2
        (root / "masks" / f"{name}.png").write_bytes(palette_png_bytes(mask))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "labels.csv").write_text("image,labels\n" + "".join(f"{n}.jpg,sky thing;ground thing\n" for n in "abcd"))
    (root / "train.txt").write_text("a\nb\n")
    (root / "val.txt").write_text("c\nd\n")
    return root


@pytest.fixture(autouse=True)
def clean_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    monkeypatch.delenv("LIT_WSSS_TRACEBACK", raising=False)


def run_cli(args: list[str], capfd) -> tuple[int, str]:
    """Exit code and stderr of ``lit-wsss <args>`` run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capfd.readouterr().err


def error_line(stderr: str) -> str:
    """The first line of stderr that reports an error (Lightning's "Seed set to 0" comes before it)."""
    return next(line for line in stderr.splitlines() if "error" in line.lower())


# --- a non-finite loss --------------------------------------------------------------------------------------

def test_nan_loss_stops_at_its_step_and_keeps_the_last_finite_checkpoint(folder, tmp_path, capfd):
    """The issue's input: lr 1e30 with validation off. Without the check it trained to the end with loss=nan,
    exit 0 and a nan last.ckpt."""
    checkpoints = tmp_path / "checkpoints"
    code, err = run_cli(["fit", *configs("folder", "cam"), "--data.init_args.root", str(folder), *TINY,
                         "--model.init_args.lr", "1e30", "--trainer.limit_val_batches", "0",
                         "--trainer.max_steps", "6", f"--trainer.default_root_dir={tmp_path}",
                         '--trainer.callbacks=[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", '
                         f'"init_args": {{"dirpath": "{checkpoints}", "every_n_train_steps": 1, "save_last": true}}}}]'],
                        capfd)
    assert code == 1
    line = error_line(err)
    assert line.startswith("lit-wsss: error: non-finite training loss at step ") and "cls=" in line
    assert "Traceback" not in err
    step = int(line.split("at step ")[1].split()[0])
    assert 1 <= step < 6  # step 0 starts from finite weights; the run stopped before max_steps
    saved = sorted(checkpoints.glob("*.ckpt"))
    assert saved, "the steps before the nan one were checkpointed"
    for path in saved:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] <= step
        assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point()), path
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == step  # the weights the nan step started from


def test_weights_that_went_non_finite_are_never_saved():
    model = CAM(num_classes=2, backbone="resnet18", pretrained=None)
    good = model.state_dict()
    checkpoint = {"state_dict": good}
    model.on_save_checkpoint(checkpoint)
    assert "protocol" in checkpoint
    broken = {**good, "classifier.weight": torch.full_like(good["classifier.weight"], float("inf"))}
    with pytest.raises(NonFiniteError, match=r"refusing to save a checkpoint .* 1 tensors hold nan/inf.*classifier"):
        model.on_save_checkpoint({"state_dict": broken})


def test_a_nan_term_is_named_even_when_the_sum_is_the_only_thing_logged():
    model = CAM(num_classes=2, backbone="resnet18", pretrained=None)
    with pytest.raises(NonFiniteError, match=r"at step 0 \(epoch 0, batch 3\) on rank 0: b=nan"):
        model.stop_on_non_finite({"a": torch.tensor(1.0), "b": torch.tensor(float("nan"))}, batch_idx=3)
    model.stop_on_non_finite({"a": torch.tensor(1.0)}, batch_idx=0)  # finite: nothing happens


# --- weights files ------------------------------------------------------------------------------------------

class Payload:
    """Unpickling this writes a marker file: proof that pickled code ran."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def weights(tmp_path):
    good = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), good)
    data = good.read_bytes()
    files = {"missing": tmp_path / "nope.pth", "empty": tmp_path / "empty.pth", "garbage": tmp_path / "garbage.pth",
             "truncated": tmp_path / "truncated.pth", "pickled": tmp_path / "pickled.pth"}
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    files["truncated"].write_bytes(data[: len(data) // 2])
    payload = Payload()
    payload.marker = tmp_path / "unpickled"
    torch.save({"conv1.weight": payload}, files["pickled"])
    return files, payload.marker


EXPECTED = {"missing": "no such file", "empty": "is empty (0 bytes)", "garbage": "is not a file written by torch.save",
            "truncated": "is a truncated or damaged zip archive", "pickled": "holds pickled Python objects"}


@pytest.mark.parametrize("option", ["pretrained", "init_weights"])
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_weights_file_is_the_first_error_line(folder, weights, tmp_path, capfd, option, kind):
    files, marker = weights
    path = files[kind]
    code, err = run_cli(["fit", *configs("folder", "cam"), "--data.init_args.root", str(folder), *TINY,
                         f"--model.init_args.{option}", str(path), "--trainer.fast_dev_run", "true",
                         f"--trainer.default_root_dir={tmp_path}"], capfd)
    assert code == 1
    assert error_line(err) == next(line for line in err.splitlines() if line.strip() and "Seed set" not in line)
    assert error_line(err).startswith(f"lit-wsss: error: {option}: ") and str(path) in error_line(err)
    assert EXPECTED[kind] in error_line(err)
    assert "Traceback" not in err and "Namespace(" not in err  # neither torch's nor jsonargparse's dump
    assert not marker.exists(), "a pickled object was executed"
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_pickled_file_still_fails_under_weights_only(weights):
    files, marker = weights
    with pytest.raises(pickle.UnpicklingError):
        torch.load(files["pickled"], weights_only=True)
    assert not marker.exists()


def test_traceback_on_request_and_worker_messages(monkeypatch, capsys):
    error = ImageFileError("image x.jpg is a truncated JPEG")
    wrapped = ImageFileError("Caught ImageFileError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                             "call last):\n  File ...\nlit_wsss.errors.ImageFileError: image x.jpg is a truncated JPEG")
    assert own_message(wrapped) == "image x.jpg is a truncated JPEG (in a DataLoader worker)"
    try:
        raise ValueError("wrapper") from error
    except ValueError as outer:
        assert report(outer) == 1
        assert capsys.readouterr().err.startswith("lit-wsss: error: image x.jpg is a truncated JPEG\n")
        monkeypatch.setenv("LIT_WSSS_TRACEBACK", "1")
        assert report(outer) is None  # the CLI re-raises: the full traceback
    assert report(ValueError("a bug")) is None  # not a ReportedError: never shortened


# --- labels and images --------------------------------------------------------------------------------------

def test_a_training_image_without_any_class_is_refused(folder, tmp_path, capfd):
    (folder / "labels.csv").write_text("image,labels\na.jpg,sky thing\nb.jpg,\nc.jpg,sky thing\nd.jpg,ground thing\n")
    args = ["fit", *configs("folder", "cam"), "--data.init_args.root", str(folder), *TINY,
            "--trainer.fast_dev_run", "true", f"--trainer.default_root_dir={tmp_path}"]
    code, err = run_cli(args, capfd)
    assert code == 1
    line = error_line(err)
    assert "1 of 2 training images of " in line and "train.txt" in line and "labels.csv" in line
    assert "['b']" in line and "allow_empty_labels" in line
    # the option lets it train (fast_dev_run returns normally)
    main([*args, "--data.init_args.allow_empty_labels", "true"])


def test_truncated_jpeg_is_detected(folder):
    path = folder / "images" / "a.jpg"
    data = path.read_bytes()
    assert not jpeg_is_truncated(data) and not jpeg_is_truncated(data + b"\0" * 16)  # trailing padding is fine
    for cut in (100, len(data) // 2, len(data) - 2):  # in the headers, in the scan, the end marker
        assert jpeg_is_truncated(data[:cut])
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageFileError, match=rf"image {path} is a truncated JPEG \({len(data) // 2} bytes"):
        read_rgb(path)
    path.write_bytes(b"")
    with pytest.raises(ImageFileError, match="empty file"):
        read_rgb(path)


@pytest.mark.parametrize("workers", [0, 2])
def test_training_on_a_truncated_jpeg_names_it(folder, tmp_path, capfd, workers):
    """The issue's case: PIL/OpenCV decode a cut JPEG with grey rows and it trained silently."""
    path = folder / "images" / "b.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 4])  # inside the scan data
    code, err = run_cli(["fit", *configs("folder", "cam"), "--data.init_args.root", str(folder), *TINY,
                         "--data.init_args.num_workers", str(workers), "--trainer.fast_dev_run", "true",
                         f"--trainer.default_root_dir={tmp_path}"], capfd)
    assert code == 1
    line = error_line(err)
    assert line.startswith(f"lit-wsss: error: image {path} is a truncated JPEG ({len(data) * 3 // 4} bytes")
    assert "Traceback" not in err


# --- eval-cam: the class count --------------------------------------------------------------------------------

def cam_folder(root: Path, out: Path, num_classes: int) -> Path:
    """CAM files for c, d and a manifest in the writer's layout stating the producer's class count."""
    out.mkdir()
    for name in "cd":
        high_res = np.zeros((2, 40, 60), np.float32)
        high_res[0, :10], high_res[1, 30:] = 1.0, 1.0
        write_cam_file(out / f"{name}.npz", {"keys": np.array([0, 1]), "high_res": high_res})
    (out / "manifest.json").write_text(json.dumps({
        "producer": "CAM", "hparams": {"num_classes": num_classes}, "protocol": {"data": {"num_classes": num_classes}},
        "bg_threshold": 0.15}))
    return out


def test_eval_cam_class_count_must_match_the_manifest_and_the_class_list(folder, tmp_path, capsys):
    cams = cam_folder(folder, tmp_path / "cams", num_classes=2)
    out = tmp_path / "eval" / "result.json"
    base = ["--cams", str(cams), "--root", str(folder), "--list", "val", "--out", str(out), "--no-progress"]
    assert eval_cam_main([*base, "--num-classes", "20"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eval-cam: error: the foreground class count differs between its sources: "
                          "--num-classes says 20, ")
    assert f"{cams / 'manifest.json'} (its producer's) says 2" in err and f"{folder / 'classes.txt'} says 2" in err
    assert not out.parent.exists()  # nothing written
    # without --num-classes the producer's count is used, and it scores the hand-made CAMs perfectly
    assert eval_cam_main([*base, "--thresholds", "0.5"]) == 0
    result = json.loads(out.read_text())
    assert result["num_classes"] == 2 and result["class_names"] == ["background", *CLASSES]
    assert result["fixed"]["miou"] == pytest.approx(1.0)
    # a manifest of another count than the root's class list
    (folder / "classes.txt").write_text("one\ntwo\nthree\n")
    assert eval_cam_main([*base, "--out", str(tmp_path / "again.json")]) == 1
    assert "says 2" in capsys.readouterr().err and not (tmp_path / "again.json").exists()


# --- concurrent writers ---------------------------------------------------------------------------------------

HOLD_LOCK = ("import sys, time; from lit_wsss.io import acquire_folder_lock; "
             "acquire_folder_lock(sys.argv[1], 'cams'); print('held', flush=True); time.sleep(120)")


def test_a_folder_held_by_a_live_process_is_refused_and_a_killed_holder_frees_it(tmp_path):
    from lit_wsss.errors import FolderInUseError
    from lit_wsss.io import LOCK_FILE, folder_lock

    out = tmp_path / "cams"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderInUseError, match=rf"cams folder {out} is being written by another process "
                                                   rf"\(pid {holder.pid} on "):
            with folder_lock(out, "cams"):
                pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with folder_lock(out, "cams"):  # kill -9 released the kernel lock: a rerun goes on
        assert json.loads((out / LOCK_FILE).read_text())["pid"] != holder.pid
    assert not (out / LOCK_FILE).exists()


def test_ir_labels_into_a_folder_being_written_is_refused(folder, tmp_path, capsys):
    from lit_wsss.refine.ir_labels import main as ir_labels_main

    cams = cam_folder(folder, tmp_path / "cams", num_classes=2)
    out = tmp_path / "ir"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    args = ["--cams", str(cams), "--root", str(folder), "--list", "val", "--out", str(out), "--workers", "1",
            "--no-progress"]
    try:
        assert holder.stdout.readline().strip() == "held"
        assert ir_labels_main(args) == 1
        assert capsys.readouterr().err.startswith(f"ir-labels: error: ir-labels folder {out} is being written by "
                                                  f"another process (pid {holder.pid} on ")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of this run
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert ir_labels_main(args) == 0  # the holder is gone: the same command runs
    assert sorted(p.name for p in out.iterdir()) == ["c.png", "d.png", "manifest.json"]


def test_a_training_list_shorter_than_one_batch_is_named(folder, tmp_path, capfd):
    """It used to fail later as "poly schedule needs max_steps > 0, got 0" (every batch dropped)."""
    code, err = run_cli(["fit", *configs("folder", "cam"), "--data.init_args.root", str(folder), *TINY,
                         "--data.init_args.batch_size", "3", "--trainer.max_steps", "2",
                         f"--trainer.default_root_dir={tmp_path}"], capfd)
    assert code == 1
    assert error_line(err) == ("lit-wsss: error: the training list has 2 images, fewer than one batch "
                               "(data.init_args.batch_size=3 x 1 processes); the last incomplete batch is dropped "
                               "(IRN), so nothing would train: lower the batch size or list more images")


def test_unknown_data_set_and_bad_fixed_threshold_are_named(folder, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=r"unknown data set 'nope': .*experiments/nope/_base.yaml does not "
                                                r"exist \(data sets: coco, folder, synth, voc\)"):
        configs("nope", "cam")
    with pytest.raises(SystemExit) as exit_info:
        eval_cam_main(["--cams", str(tmp_path), "--root", str(folder), "--out", str(tmp_path / "r.json"),
                       "--fixed-threshold", "nan"])
    assert exit_info.value.code == 2
    assert "--fixed-threshold must be a finite number, got nan" in capsys.readouterr().err


def test_a_corrupt_official_label_file_is_named(tmp_path):
    from lit_wsss.datamodules.labels import read_official_cls_labels

    path = tmp_path / "cls_labels.npy"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(ValueError, match=rf"{path}: not an official cls_labels.npy"):
        read_official_cls_labels(path)


@pytest.mark.parametrize("kind", ["missing", "empty", "garbage", "truncated"])
def test_a_bad_ckpt_path_is_named_before_lightning_reads_it(folder, weights, tmp_path, capfd, kind):
    files, _ = weights
    code, err = run_cli(["fit", *configs("folder", "cam"), "--data.init_args.root", str(folder), *TINY,
                         "--trainer.max_steps", "1", f"--ckpt_path={files[kind]}",
                         f"--trainer.default_root_dir={tmp_path}"], capfd)
    assert code == 1
    expected = {**EXPECTED, "garbage": "is not a zip archive"}[kind]
    assert error_line(err).startswith(f"lit-wsss: error: --ckpt_path: ") and str(files[kind]) in error_line(err)
    assert expected in error_line(err) and "Traceback" not in err


# --- data errors as one line (issue 17's "traceback" rows, docs/reliability.md) ------------------------------

def _break(folder: Path, case: str) -> list[str]:
    """Break one thing of the folder data set; the extra command-line arguments of the case."""
    if case == "missing root":
        return ["--data.init_args.root", str(folder / "nope")]
    if case == "missing list":
        return ["--data.init_args.train_list", "nope"]
    if case == "empty list":
        (folder / "train.txt").write_text("")
    elif case == "unknown class":
        (folder / "labels.csv").write_text("image,labels\na.jpg,cloud\n" + "".join(f"{n}.jpg,sky thing\n" for n in "bcd"))
    elif case == "id without label":
        Image.open(folder / "images" / "a.jpg").save(folder / "images" / "e.jpg")
        (folder / "train.txt").write_text("a\nb\ne\n")
    elif case == "mask values":
        mask = np.full((40, 60), 50, np.uint8)
        (folder / "masks" / "c.png").write_bytes(palette_png_bytes(mask))
    return []


@pytest.mark.parametrize("case, expected", [
    ("missing root", "nope"), ("missing list", "split list 'nope' not found"), ("empty list", "train.txt is empty"),
    ("unknown class", "labels.csv: line 2: unknown class 'cloud'"), ("id without label", "have no label in"),
    ("mask values", "c.png holds values [50]; expected 0..2 or 255"),
])
def test_a_data_error_is_one_line_naming_the_file(folder, tmp_path, capfd, case, expected):
    """Each used to end a Python traceback (the message right, but in its last line)."""
    extra = _break(folder, case)
    subcommand = "validate" if case == "mask values" else "fit"  # masks are read by the validation loop
    code, err = run_cli([subcommand, *configs("folder", "cam"), "--data.init_args.root", str(folder), *TINY, *extra,
                         "--trainer.max_steps", "1", f"--trainer.default_root_dir={tmp_path}"], capfd)
    assert code == 1
    assert error_line(err).startswith("lit-wsss: error: ") and expected in error_line(err), err[-2000:]
    assert "Traceback" not in err


def test_a_cam_export_into_a_file_or_another_producers_folder_is_one_line(folder, tmp_path, capfd):
    export = ["predict", *configs("folder", "cam"), "--config", "experiments/stages/predict_cams.yaml",
              "--data.init_args.root", str(folder), "--data.init_args.predict_list", "val", *TINY[:-1]]
    a_file = tmp_path / "cams_file"
    a_file.write_text("")
    code, err = run_cli([*export, f"--trainer.callbacks.init_args.out_dir={a_file}"], capfd)
    assert code == 1 and error_line(err) == f"lit-wsss: error: out_dir {a_file} is a file: expected a folder"
    cams = tmp_path / "cams"
    main([*export, f"--trainer.callbacks.init_args.out_dir={cams}"])
    assert (cams / "manifest.json").is_file()
    capfd.readouterr()
    code, err = run_cli([*export, f"--trainer.callbacks.init_args.out_dir={cams}", "--model.init_args.cam_scales",
                         "[1.0, 0.5]"], capfd)
    assert code == 1 and "holds CAMs of another producer" in error_line(err) and "Traceback" not in err
