"""Compact CAM files (issue 18): float16 maps and files without ``high_res``, read by eval-cam, ir-labels and
IRNet's data set through the one reader (lit_wsss.cam_files)."""

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from lit_wsss.callbacks import CAMWriter
from lit_wsss.cam_files import cam_path, high_res_from_cam, read_cam_file, write_cam_file
from lit_wsss.datamodules.irn import CAMInputDataset
from lit_wsss.evaluation import evaluate_cam_folder
from lit_wsss.io import save_npz_atomic
from lit_wsss.modules import CAM
from lit_wsss.refine.ir_labels import make_ir_labels

from test_writers import make_datamodule

THRESHOLDS = [0.05, 0.15, 0.3]


@pytest.mark.parametrize(("rule", "size"), [("padded", (18, 27)), ("padded", (20, 24)), ("full", (18, 27))])
def test_the_upsampling_is_torchs_bilinear_rule(rule, size):
    cam = np.random.default_rng(0).random((2, -(-size[0] // 4), -(-size[1] // 4)), dtype=np.float32)
    tensor = torch.from_numpy(cam)[None]
    canvas = (16 * -(-size[0] // 16), 16 * -(-size[1] // 16)) if rule == "padded" else size
    expected = F.interpolate(tensor, canvas, mode="bilinear", align_corners=False)[0, :, :size[0], :size[1]]
    got = high_res_from_cam(cam, size, rule)
    assert got.shape == (2, *size) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=2e-6)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The same CAMs written three ways: float32 (today's files), float16, and float32 without high_res."""
    root = tmp_path_factory.mktemp("compact")
    folders = {}
    for name, options in {"float32": {}, "float16": {"dtype": "float16"},
                          "compact": {"store_high_res": False}}.items():
        torch.manual_seed(0)
        model = CAM(num_classes=3, backbone="resnet18", pretrained=None, cam_scales=(1.0, 0.5))
        folders[name] = root / name
        trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             callbacks=[CAMWriter(str(folders[name]), **options)])
        trainer.predict(model, make_datamodule(root / "synthetic"), return_predictions=False)
    ids = sorted(json.loads((folders["float32"] / "manifest.json").read_text())["images"])
    return folders, root / "synthetic", ids


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_manifest_records_the_storage_and_the_sizes(exports):
    folders, _, ids = exports
    manifests = {name: json.loads((folder / "manifest.json").read_text()) for name, folder in folders.items()}
    assert manifests["float32"]["storage"] == {"dtype": "float32", "high_res": "stored"}
    assert manifests["float16"]["storage"]["dtype"] == "float16"
    assert manifests["compact"]["storage"]["high_res"] == "upsampled from cam by the reader (padded)"
    assert manifests["compact"]["images"] == manifests["float32"]["images"]  # sizes read from the compact files
    with np.load(cam_path(folders["compact"], ids[0]), allow_pickle=False) as data:
        assert "high_res" not in data.files and data["cam"].dtype == np.float32


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_float16_files_score_as_the_rounded_float32_maps(exports, tmp_path):
    """Exactly the scores of the float32 maps rounded to float16 (rounded here with numpy); against float32 itself
    only pixels within float16's step of a threshold can change (measured on real CAMs in docs/benchmarks.md)."""
    folders, root, ids = exports
    rounded = tmp_path / "rounded"
    rounded.mkdir()
    for image_id in ids:
        full, half = (read_cam_file(cam_path(folders[n], image_id)) for n in ("float32", "float16"))
        assert half["high_res"].dtype == np.float32  # readers always get float32
        np.testing.assert_array_equal(half["high_res"], full["high_res"].astype(np.float16).astype(np.float32))
        write_cam_file(cam_path(rounded, image_id), {"keys": full["keys"],
                                                     "high_res": full["high_res"].astype(np.float16)})
    scores = {name: evaluate_cam_folder(folder, root, ids, THRESHOLDS, 3, progress=False)["miou"]
              for name, folder in (("float32", folders["float32"]), ("float16", folders["float16"]),
                                   ("rounded", rounded))}
    assert scores["float16"] == scores["rounded"]
    np.testing.assert_allclose(scores["float16"], scores["float32"], rtol=0, atol=5e-4)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_irnet_reads_the_same_cams_from_compact_files(exports):
    folders, root, ids = exports
    images = make_datamodule(root)
    images.setup("predict")
    datasets = {name: CAMInputDataset(images.predict_dataset, folders[name]) for name in ("float32", "compact")}
    for index in range(len(ids)):
        stored, compact = (datasets[name][index] for name in ("float32", "compact"))
        assert torch.equal(stored["cam"], compact["cam"]) and torch.equal(stored["keys"], compact["keys"])


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_eval_cam_and_ir_labels_read_compact_files_as_upsampled_cams(exports, tmp_path):
    """On a compact folder both tools give what they give on full files whose high_res is torch's upsampling
    of the same cam (written here independently of the reader)."""
    folders, root, ids = exports
    reference = tmp_path / "torch_upsampled"
    reference.mkdir()
    for image_id in ids:
        stored = read_cam_file(cam_path(folders["float32"], image_id), ("keys", "high_res", "cam"))
        height, width = stored["high_res"].shape[1:]
        canvas = (16 * -(-height // 16), 16 * -(-width // 16))  # the synthetic exports use the padded rule
        upsampled = F.interpolate(torch.from_numpy(stored["cam"])[None], canvas, mode="bilinear",
                                  align_corners=False)[0, :, :height, :width]
        write_cam_file(cam_path(reference, image_id), {"keys": stored["keys"], "cam": stored["cam"],
                                                       "high_res": upsampled.numpy()})
    compact = evaluate_cam_folder(folders["compact"], root, ids, THRESHOLDS, 3, progress=False)
    expected = evaluate_cam_folder(reference, root, ids, THRESHOLDS, 3, progress=False)
    np.testing.assert_allclose(compact["miou"], expected["miou"], rtol=0, atol=1e-9)
    make_ir_labels(folders["compact"], root, ids, tmp_path / "ir_compact", workers=1, progress=False)
    make_ir_labels(reference, root, ids, tmp_path / "ir_reference", workers=1, progress=False)
    for image_id in ids:
        assert (tmp_path / "ir_compact" / f"{image_id}.png").read_bytes() == \
            (tmp_path / "ir_reference" / f"{image_id}.png").read_bytes()


def test_a_compact_file_without_its_cam_is_refused_by_name(tmp_path):
    path = tmp_path / "2007_000001.npz"
    save_npz_atomic(path, keys=np.array([1], np.int64), size=np.array([8, 8], np.int64),
                    high_res_rule=np.asarray("padded"))
    with pytest.raises(ValueError, match=r"2007_000001\.npz.*missing array\(s\) \['cam'\]"):
        read_cam_file(path)
    with pytest.raises(ValueError, match="x.npz: a file without high_res needs cam and a rule"):
        write_cam_file(tmp_path / "x.npz", {"keys": np.array([0]), "high_res": np.zeros((1, 4, 4))},
                       high_res_rule="nearest")
