"""IR labels streamed from the CAM export (``CAMWriter(ir_labels=...)``, issue 18) against the two-step path: the
export, then ``make_ir_labels`` over the finished CAM folder (tests/test_ir_labels.py checks that one against
hand-worked labels)."""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from test_writers import make_datamodule

from lit_wsss.callbacks import CAMWriter
from lit_wsss.errors import OutputFolderError
from lit_wsss.refine.ir_labels import PARAMETER_KEYS, IRLabelStream, _comparable, make_ir_labels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def export(tmp_path, cams, ir_labels=None, devices=1, **writer):
    """CAMs (and streamed IR labels) of the 5 images of the small synthetic set, from a seeded random ResNet-18."""
    from lit_wsss.modules import CAM

    torch.manual_seed(0)
    model = CAM(num_classes=3, backbone="resnet18", pretrained=None, cam_scales=(1.0,))
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         logger=False, enable_progress_bar=False,
                         callbacks=[CAMWriter(str(cams), ir_labels=ir_labels, **writer)])
    trainer.predict(model, make_datamodule(tmp_path / "synthetic"), return_predictions=False)
    return json.loads((cams / "manifest.json").read_text())


def labels(folder):
    return {p.stem: np.array(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_streamed_ir_labels_equal_the_tool_on_the_finished_folder_and_resume(tmp_path):
    cams, streamed, reference = tmp_path / "cams", tmp_path / "ir_streamed", tmp_path / "ir_reference"
    manifest = export(tmp_path, cams, {"out_dir": str(streamed), "workers": 2})
    ids = sorted(manifest["images"])
    make_ir_labels(cams, tmp_path / "synthetic", ids, reference, workers=1, progress=False)
    got, want = labels(streamed), labels(reference)
    assert sorted(got) == ids and sorted(want) == ids
    for image_id in ids:
        assert got[image_id].tobytes() == want[image_id].tobytes(), image_id
    # not a vacuous comparison: confident classes, confident background and uncertain pixels all occur
    values = set(np.unique(np.concatenate([v.ravel() for v in got.values()])).tolist())
    assert 0 in values and 255 in values and values - {0, 255}, values
    ir_manifest = json.loads((streamed / "manifest.json").read_text())
    assert ir_manifest["complete"] and ir_manifest["streamed"] and ir_manifest["ids"] == ids
    assert ir_manifest["written_this_run"] == 5 and ir_manifest["cams_manifest"]["count"] == 5
    assert manifest["ir_labels"] == str(streamed)
    reference_manifest = json.loads((reference / "manifest.json").read_text())
    assert {k: _comparable(ir_manifest)[k] for k in PARAMETER_KEYS} == _comparable(reference_manifest)
    # the pipeline's IR-label stage (the tool) finds the streamed folder finished
    again = make_ir_labels(cams, tmp_path / "synthetic", ids, streamed, workers=1, progress=False)
    assert again["written"] == 0 and again["skipped"] == 5

    # an id whose PNG is missing (killed between its CAM file and its CRF) is exported again, nothing else
    lost = ids[2]
    (streamed / f"{lost}.png").unlink()
    manifest = export(tmp_path, cams, {"out_dir": str(streamed), "workers": 1})
    assert manifest["written_this_run"] == 1 and manifest["count"] == 5
    assert labels(streamed)[lost].tobytes() == want[lost].tobytes()
    assert json.loads((streamed / "manifest.json").read_text())["written_this_run"] == 1

    # other thresholds into the same folder are refused, naming the difference, and nothing changes
    before = {p.name: p.read_bytes() for p in streamed.iterdir()}
    with pytest.raises(OutputFolderError, match=r"other parameters \(differs in \['fg_threshold'\]"):
        export(tmp_path, cams, {"out_dir": str(streamed), "fg": 0.5})
    assert {p.name: p.read_bytes() for p in streamed.iterdir()} == before


def test_two_process_stream_writes_each_id_once_and_equal_labels(tmp_path):
    cams, streamed, reference = tmp_path / "cams", tmp_path / "ir_streamed", tmp_path / "ir_reference"
    manifest = export(tmp_path, cams, {"out_dir": str(streamed), "workers": 1}, devices=2)
    assert manifest["world_size"] == 2 and manifest["written_by_rank"] == {"0": 3, "1": 2}
    ids = sorted(manifest["images"])
    make_ir_labels(cams, tmp_path / "synthetic", ids, reference, workers=1, progress=False)
    got, want = labels(streamed), labels(reference)
    assert sorted(got) == ids
    assert all(got[i].tobytes() == want[i].tobytes() for i in ids)
    ir_manifest = json.loads((streamed / "manifest.json").read_text())
    assert ir_manifest["complete"] and ir_manifest["written_this_run"] == 5
    assert sorted(p.name for p in streamed.iterdir()) == sorted([f"{i}.png" for i in ids] + ["manifest.json"])


def test_stream_options_are_checked():
    with pytest.raises(ValueError, match=r"unknown \['fgg'\]"):
        IRLabelStream.from_options({"out_dir": "x", "fgg": 0.3}, "constant")
    with pytest.raises(ValueError, match="expected out_dir"):
        IRLabelStream.from_options({"fg": 0.3}, "constant")
    with pytest.raises(ValueError, match="explicit"):  # SIPE's convention takes no thresholds
        IRLabelStream.from_options({"out_dir": "x", "fg": 0.3}, "explicit")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        IRLabelStream.from_options({"out_dir": "x", "workers": 0}, "constant")


def test_a_failing_image_names_its_id_and_file_and_the_lock_is_freed(tmp_path):
    """The worker's error reaches the writer (at the next submit or at wait) naming the id and the image; stop()
    frees the folder for a rerun."""
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(image)
    stream = IRLabelStream(tmp_path / "ir", workers=1)
    stream.open(tmp_path / "cams", {"producer": "CAM"}, tmp_path, ["a"], overwrite=False)
    stream.start()
    stream.submit("a", image, np.array([0]), np.zeros((1, 9, 10), np.float32))  # one row short
    with pytest.raises(ValueError, match=r"size mismatch for id 'a': image .*a\.png is 10x8 but the CAMs of id 'a'"):
        stream.wait()
    stream.stop()
    assert not (tmp_path / "ir" / ".lock").exists() and not (tmp_path / "ir" / "a.png").exists()
    assert json.loads((tmp_path / "ir" / "manifest.json").read_text())["complete"] is False
