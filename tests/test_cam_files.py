"""The CAM file (lit_wsss.cam_files): one writer, one reader, errors that name the file, and tools that read
CAM files without importing Lightning or albumentations."""

import subprocess
import sys

import numpy as np
import pytest

from lit_wsss.cam_files import cam_file_info, cam_path, load_cam_file, read_cam_file, read_cam_manifest, write_cam_file


def test_round_trip_dtypes_and_byte_reproducible(tmp_path):
    keys = np.array([3, 7], np.int32)
    high_res = np.random.default_rng(0).random((2, 5, 6))  # float64 in: stored as float32
    cam = high_res[:, ::4, ::4]
    path = cam_path(tmp_path, "2007_000032")
    assert path == tmp_path / "2007_000032.npz"
    write_cam_file(path, {"keys": keys, "high_res": high_res, "cam": cam})
    first = path.read_bytes()
    write_cam_file(path, {"keys": keys, "high_res": high_res, "cam": cam})
    assert path.read_bytes() == first
    arrays = read_cam_file(path, ("keys", "high_res", "cam", "bg"))
    assert sorted(arrays) == ["cam", "high_res", "keys"]  # no bg in this file, and none invented
    assert arrays["keys"].dtype == np.int64 and arrays["keys"].tolist() == [3, 7]
    assert arrays["high_res"].dtype == np.float32
    np.testing.assert_array_equal(arrays["high_res"], high_res.astype(np.float32))
    assert cam_file_info(path) == {"num_classes": 2, "size": [5, 6]}
    got_keys, got_high_res, bg = load_cam_file(path)
    assert bg is None and got_keys.tolist() == [3, 7] and got_high_res.shape == (2, 5, 6)
    # the walked scores beside pseudo labels: float16, with an own background
    write_cam_file(path, {"keys": keys, "high_res": high_res, "bg": high_res[0]}, high_res_dtype=np.float16)
    with np.load(path, allow_pickle=False) as stored:
        assert stored["high_res"].dtype == np.float16 and stored["bg"].dtype == np.float16
    _, half, bg = load_cam_file(path)  # readers hand out float32 (exactly the stored float16 values)
    assert half.dtype == np.float32 and bg.dtype == np.float32 and bg.shape == (5, 6)
    np.testing.assert_array_equal(half, high_res.astype(np.float16).astype(np.float32))


def test_bad_cam_files_name_the_file(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(ValueError, match=r"x.npz: arrays \['hig_res', 'keys'\].*unknown: \['hig_res'\]"):
        write_cam_file(path, {"keys": np.zeros(1), "hig_res": np.zeros((1, 2, 2))})
    assert not path.exists()
    with pytest.raises(ValueError, match=r"cannot read CAM file .*x.npz"):
        read_cam_file(path)  # missing
    np.savez(path, keys=np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=r"cannot read CAM file .*x.npz: missing array\(s\) \['high_res'\]"):
        load_cam_file(path)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"cannot read CAM file .*x.npz"):
        load_cam_file(path)
    np.savez(path, keys=np.array([{"a": 1}], dtype=object), high_res=np.zeros((1, 2, 2)))  # np.save pickles it
    with pytest.raises(ValueError, match=r"cannot read CAM file .*x.npz.*pickle"):
        load_cam_file(path)


def test_manifest_threshold_is_checked(tmp_path):
    assert read_cam_manifest(tmp_path) == {}
    with pytest.raises(FileNotFoundError, match="CAMs: .*manifest.json not found"):
        read_cam_manifest(tmp_path, required=True)
    (tmp_path / "manifest.json").write_text('{"bg_threshold": "0.15"}')
    with pytest.raises(ValueError, match=r"manifest.json: bg_threshold must be a number or null, got '0.15'"):
        read_cam_manifest(tmp_path)


def test_file_tools_import_neither_lightning_nor_albumentations():
    code = ("import sys, lit_wsss.evaluation, lit_wsss.refine.ir_labels, lit_wsss.eval_seg, lit_wsss.cam_files; "
            "print(sorted(m for m in ('albumentations', 'pytorch_lightning', 'lightning') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
