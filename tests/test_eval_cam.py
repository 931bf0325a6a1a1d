"""CAM evaluation tool: one-pass threshold sweep, folder evaluation and CLI (protocol.md §5, §11 item 4)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from lit_wsss.cams import cams_to_mask
from lit_wsss.datamodules.labels import load_cls_labels
from lit_wsss.evaluation import evaluate_cam_folder, main, parse_thresholds, write_reports
from lit_wsss.metrics import miou_from_confusion
from lit_wsss.scores import argmax_confusion, sweep_confusions

# Coarse value grid: CAM values and thresholds are drawn from the same float64 numbers, so equal CAM values
# (argmax ties) and CAM values equal to a threshold both occur.
GRID = np.round(np.arange(21) * 0.05, 10)
PALETTE = [value for index in range(256) for value in (index, (37 * index) % 256, (91 * index) % 256)]


def reference_confusion(high_res, keys, gt, tau, num_classes):
    """The straightforward decoding: cams_to_mask at one threshold, then a bincount over gt != 255."""
    cams, keys = torch.from_numpy(np.asarray(high_res)), torch.from_numpy(np.asarray(keys, np.int64))
    pred = cams_to_mask(cams, keys, tau).numpy().reshape(-1)
    gt = np.asarray(gt).reshape(-1)
    valid = gt != 255
    n = num_classes + 1
    return np.bincount(gt[valid].astype(np.int64) * n + pred[valid], minlength=n * n).reshape(n, n)


def reference_argmax(high_res, keys, gt, bg, num_classes):
    stacked = torch.cat([torch.from_numpy(bg)[None], torch.from_numpy(high_res)])
    lookup = torch.cat([torch.zeros(1, dtype=torch.long), torch.from_numpy(keys).long() + 1])
    pred = lookup[stacked.argmax(0)].numpy().reshape(-1)
    gt = gt.reshape(-1)
    valid = gt != 255
    n = num_classes + 1
    return np.bincount(gt[valid].astype(np.int64) * n + pred[valid], minlength=n * n).reshape(n, n)


def random_case(rng, num_classes, num_keys, height=13, width=17, dtype=np.float32):
    keys = rng.choice(num_classes, size=num_keys, replace=False).astype(np.int64)
    high_res = GRID[rng.integers(0, len(GRID), size=(num_keys, height, width))].astype(dtype)
    gt = rng.integers(0, num_classes + 1, size=(height, width)).astype(np.uint8)
    gt[rng.random((height, width)) < 0.2] = 255
    return high_res, keys, gt


def random_thresholds(rng):
    picked = list(GRID[rng.choice(len(GRID), size=8, replace=False)])
    # a duplicate, one below and one above every CAM value, one off the grid
    thresholds = picked + [picked[0], -0.1, 1.5, float(rng.random())]
    rng.shuffle(thresholds)
    return thresholds


@pytest.mark.parametrize("seed", range(8))
def test_sweep_equals_per_threshold_reference(seed):
    rng = np.random.default_rng(seed)
    num_classes = int(rng.choice([3, 20]))
    num_keys = int(rng.integers(0, 4)) if seed else 0  # seed 0: K = 0
    high_res, keys, gt = random_case(rng, num_classes, num_keys)
    thresholds = random_thresholds(rng)
    sweep = sweep_confusions(high_res, keys, gt, thresholds, num_classes)
    assert sweep.dtype == np.int64 and sweep.shape == (len(thresholds), num_classes + 1, num_classes + 1)
    for index, tau in enumerate(thresholds):  # the caller's (unsorted) order is kept
        np.testing.assert_array_equal(sweep[index], reference_confusion(high_res, keys, gt, tau, num_classes))


def test_sweep_ties_at_the_threshold_and_float64_and_torch_inputs():
    rng = np.random.default_rng(11)
    high_res, keys, gt = random_case(rng, 20, 3, 24, 31, dtype=np.float64)
    high_res[1] = high_res[0]  # every pixel ties between two channels: the first one must win
    thresholds = [float(v) for v in GRID]  # every CAM value equals some threshold
    as_torch = [torch.from_numpy(a) for a in (high_res, keys, gt)]
    sweep = sweep_confusions(*as_torch, thresholds, 20)
    for index, tau in enumerate(thresholds):
        np.testing.assert_array_equal(sweep[index], reference_confusion(high_res, keys, gt, tau, 20))
    # float32 CAMs compare with float32(tau), like the reference's background plane
    sweep32 = sweep_confusions(high_res.astype(np.float32), keys, gt, thresholds, 20)
    for index, tau in enumerate(thresholds):
        np.testing.assert_array_equal(sweep32[index],
                                      reference_confusion(high_res.astype(np.float32), keys, gt, tau, 20))


def test_sweep_rejects_bad_input():
    high_res, keys, gt = random_case(np.random.default_rng(0), 5, 2)
    with pytest.raises(ValueError, match="ground truth holds values"):
        sweep_confusions(high_res, keys, np.full_like(gt, 9), [0.1], 5)
    with pytest.raises(ValueError, match="keys"):
        sweep_confusions(high_res, np.array([0, 5]), gt, [0.1], 5)
    with pytest.raises(ValueError, match="high_res"):
        sweep_confusions(high_res[:, :-1], keys, gt, [0.1], 5)


def test_argmax_confusion_ties_go_to_background():
    rng = np.random.default_rng(3)
    high_res, keys, gt = random_case(rng, 20, 3)
    bg = GRID[rng.integers(0, len(GRID), size=gt.shape)].astype(np.float32)
    np.testing.assert_array_equal(argmax_confusion(high_res, keys, gt, bg, 20),
                                  reference_argmax(high_res, keys, gt, bg, 20))


# ----------------------------------------------------------------------------------------- tiny VOC folder


def write_mask(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask.astype(np.uint8))
    image.putpalette(PALETTE)
    image.save(path)


def write_cam(path, keys, high_res, bg=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"keys": np.asarray(keys, np.int64), "high_res": high_res.astype(np.float32),
              "cam": high_res[:, ::4, ::4].astype(np.float32)}
    if bg is not None:
        arrays["bg"] = bg.astype(np.float32)
    np.savez(path, **arrays)


def make_dataset(tmp_path, num_images=5, seed=0, gt_folder="SegmentationClass", with_bg=False, perfect=False):
    """Random masks and CAMs (labelled classes = classes present in the mask), VOC layout under tmp_path."""
    rng = np.random.default_rng(seed)
    root, cams = tmp_path / "voc", tmp_path / "cams"
    ids = [f"2007_{index:06d}" for index in range(num_images)]
    for image_id in ids:
        height, width = int(rng.integers(9, 20)), int(rng.integers(9, 20))
        classes = rng.choice(np.arange(1, 21), size=int(rng.integers(1, 4)), replace=False)
        gt = rng.choice(np.concatenate([[0], classes]), size=(height, width)).astype(np.uint8)
        gt[rng.random((height, width)) < 0.1] = 255
        keys = np.sort(classes) - 1
        if perfect:
            high_res = np.stack([(gt == k + 1).astype(np.float32) for k in keys])
        else:
            high_res = GRID[rng.integers(0, len(GRID), size=(len(keys), height, width))].astype(np.float32)
        bg = GRID[rng.integers(0, len(GRID), size=(height, width))] if with_bg else None
        write_mask(root / gt_folder / f"{image_id}.png", gt)
        write_cam(cams / f"{image_id}.npz", keys, high_res, bg)
    return root, cams, ids


def reference_folder(root, cams, ids, thresholds, gt_folder="SegmentationClass"):
    total = np.zeros((len(thresholds), 21, 21), np.int64)
    for image_id in ids:
        with np.load(cams / f"{image_id}.npz") as data:
            keys, high_res = data["keys"], data["high_res"]
        gt = np.array(Image.open(root / gt_folder / f"{image_id}.png"))
        for index, tau in enumerate(thresholds):
            total[index] += reference_confusion(high_res, keys, gt, tau, 20)
    return total


def test_folder_equals_dataset_level_reference(tmp_path):
    root, cams, ids = make_dataset(tmp_path, num_images=6)
    (cams / "junk.tmp.npz").write_bytes(b"partial write")  # not <id>.npz of a listed id: ignored
    (cams / f"{ids[0]}.npz.tmp").write_bytes(b"partial write")  # CAMWriter's temporary name
    (cams / "manifest.json").write_text(json.dumps({"bg_threshold": 0.3, "method": "test", "other": [1]}))
    thresholds = [0.45, 0.0, 0.05, 0.15, 0.6]
    result = evaluate_cam_folder(cams, root, ids, thresholds, progress=False)
    expected = reference_folder(root, cams, ids, thresholds)
    np.testing.assert_array_equal(np.array(result["confusion"]), expected)
    assert result["thresholds"] == thresholds and result["num_images"] == 6 and result["mode"] == "sweep"
    for index in range(len(thresholds)):
        expected_miou = miou_from_confusion(torch.from_numpy(expected[index])).item()
        assert math.isclose(result["miou"][index], expected_miou)
    assert result["best"]["miou"] == max(result["miou"])
    assert result["best"]["chosen"] == "oracle (best on these masks)"
    # fixed threshold from the manifest, outside the sweep: evaluated anyway
    fixed = result["fixed"]
    assert fixed["threshold"] == 0.3 and fixed["chosen"] == "fixed" and not fixed["in_sweep"]
    np.testing.assert_array_equal(np.array(fixed["confusion"]), reference_folder(root, cams, ids, [0.3])[0])
    assert len(result["class_names"]) == 21 and result["class_names"][1] == "aeroplane"
    assert result["ground_truth"].endswith("SegmentationClass")
    # precision / recall definitions
    matrix = expected[0].astype(float)
    for c in range(21):
        precision, recall = result["precision"][0][c], result["recall"][0][c]
        assert (precision is None) == (matrix[:, c].sum() == 0)
        assert (recall is None) == (matrix[c].sum() == 0)
        if precision is not None:
            assert math.isclose(precision, matrix[c, c] / matrix[:, c].sum())
    json.dumps(result, allow_nan=False)  # JSON-serialisable as is, no NaN


def test_manifest_without_threshold_falls_back_to_irn_default(tmp_path):
    root, cams, ids = make_dataset(tmp_path, num_images=2)
    (cams / "manifest.json").write_text(json.dumps({"bg_threshold": None, "images": {i: {} for i in ids}}))
    result = evaluate_cam_folder(cams, root, ids, [0.1, 0.15], progress=False)
    assert result["fixed"]["threshold"] == 0.15 and result["fixed"]["in_sweep"]
    assert "images" not in result["manifest"]
    explicit = evaluate_cam_folder(cams, root, ids, [0.1], fixed_threshold=0.4, progress=False)
    assert explicit["fixed"]["threshold"] == 0.4
    (cams / "manifest.json").write_text(json.dumps({"bg_threshold": "high"}))
    with pytest.raises(ValueError, match="manifest.json"):
        evaluate_cam_folder(cams, root, ids, [0.1], progress=False)


def test_perfect_cam_and_threshold_above_every_value(tmp_path):
    root, cams, ids = make_dataset(tmp_path, perfect=True)
    result = evaluate_cam_folder(cams, root, ids, [0.5, 1.5], fixed_threshold=0.5, progress=False)
    assert result["miou"][0] == 1.0 and result["fixed"]["miou"] == 1.0 and result["best"]["threshold"] == 0.5
    above = np.array(result["confusion"][1])
    assert above[:, 1:].sum() == 0 and above[:, 0].sum() > 0  # everything predicted background
    assert result["iou"][1][0] < 1 and all(v in (0.0, None) for v in result["iou"][1][1:])


def test_segmentation_class_aug_fallback_and_mask_dir(tmp_path):
    root, cams, ids = make_dataset(tmp_path, gt_folder="SegmentationClassAug")
    result = evaluate_cam_folder(cams, root, ids, [0.15], progress=False)
    assert result["ground_truth"].endswith("SegmentationClassAug")
    expected = reference_folder(root, cams, ids, [0.15], gt_folder="SegmentationClassAug")
    np.testing.assert_array_equal(np.array(result["confusion"]), expected)
    (root / "SegmentationClassAug").rename(root / "masks")
    assert evaluate_cam_folder(cams, root, ids, [0.15], mask_dir="masks", progress=False)["confusion"] \
        == expected.tolist()


def test_size_mismatch_and_bad_values_name_the_files(tmp_path):
    root, cams, ids = make_dataset(tmp_path)
    with np.load(cams / f"{ids[2]}.npz") as data:
        height, width = data["high_res"].shape[1:]
    write_mask(root / "SegmentationClass" / f"{ids[2]}.png", np.zeros((height + 1, width), np.uint8))
    with pytest.raises(ValueError, match=rf"{ids[2]}\.png.*{ids[2]}\.npz"):
        evaluate_cam_folder(cams, root, ids, [0.15], progress=False)
    bad = np.zeros((height, width), np.uint8)
    bad[0, 0] = 21
    write_mask(root / "SegmentationClass" / f"{ids[2]}.png", bad)
    with pytest.raises(ValueError, match=rf"{ids[2]}\.png holds values \[21\]"):
        evaluate_cam_folder(cams, root, ids, [0.15], progress=False)


def test_missing_cam_file_names_the_id(tmp_path):
    root, cams, ids = make_dataset(tmp_path)
    (cams / f"{ids[3]}.npz").unlink()
    with pytest.raises(FileNotFoundError, match=ids[3]):
        evaluate_cam_folder(cams, root, ids, [0.15], progress=False)


def test_bg_files_use_plain_argmax(tmp_path):
    root, cams, ids = make_dataset(tmp_path, with_bg=True)
    result = evaluate_cam_folder(cams, root, ids, [0.15, 0.3], progress=False)
    assert result["mode"] == "bg_argmax" and result["thresholds"] == [] and result["best"] is None
    assert "sweep does not apply" in result["note"]
    expected = np.zeros((21, 21), np.int64)
    for image_id in ids:
        with np.load(cams / f"{image_id}.npz") as data:
            keys, high_res, bg = data["keys"], data["high_res"], data["bg"]
        gt = np.array(Image.open(root / "SegmentationClass" / f"{image_id}.png"))
        expected += reference_argmax(high_res, keys, gt, bg, 20)
    block = result["bg_argmax"]
    np.testing.assert_array_equal(np.array(block["confusion"]), expected)
    assert math.isclose(block["miou"], miou_from_confusion(torch.from_numpy(expected)).item())
    paths = write_reports(result, tmp_path / "out" / "bg.json")
    assert paths["curve"] is None and "argmax" in paths["markdown"].read_text()


# ----------------------------------------------------------------------------------------- CLI


def test_parse_thresholds():
    grid = parse_thresholds("0.0:0.6:0.03")
    assert len(grid) == 21 and grid[0] == 0.0 and grid[-1] == 0.6 and grid[5] == 0.15
    assert parse_thresholds("0.05:0.6:0.05") == [round(0.05 * i, 10) for i in range(1, 13)]
    assert parse_thresholds("0:0.5:0.2") == [0.0, 0.2, 0.4]  # stop off the grid: excluded
    assert parse_thresholds("0.3, 0.1,0.15") == [0.3, 0.1, 0.15]
    for bad in ("0:1", "0.1:0:0.1", "0:1:0", "a,b", ""):
        with pytest.raises(ValueError):
            parse_thresholds(bad)


def test_cli_writes_json_markdown_and_png(tmp_path, capsys):
    root, cams, ids = make_dataset(tmp_path)
    id_list = tmp_path / "ids.txt"  # SIPE line format
    id_list.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    out = tmp_path / "report" / "result.json"
    code = main(["--cams", str(cams), "--root", str(root), "--list", str(id_list),
                 "--thresholds", "0.0:0.6:0.03", "--out", str(out), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    for key in ("thresholds", "miou", "iou", "precision", "recall", "best", "fixed", "num_images",
                "class_names", "ground_truth"):
        assert key in result
    assert len(result["thresholds"]) == 21 and result["thresholds"][-1] == 0.6
    assert result["fixed"]["threshold"] == 0.15 and result["fixed"]["in_sweep"]
    assert len(result["iou"]) == 21 and len(result["iou"][0]) == 21
    assert result["num_images"] == len(ids)
    markdown = out.with_suffix(".md").read_text()
    assert "aeroplane" in markdown and "oracle" in markdown
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG"
    printed = capsys.readouterr().out
    assert "fixed threshold 0.15" in printed and str(out) in printed
    # a missing CAM file is an error with exit code 1, not a traceback
    (cams / f"{ids[0]}.npz").unlink()
    assert main(["--cams", str(cams), "--root", str(root), "--list", str(id_list), "--out", str(out),
                 "--no-progress"]) == 1
    assert ids[0] in capsys.readouterr().err


@pytest.mark.shared_data
def test_ground_truth_cams_on_voc12_bench(shared_data, tmp_path):
    root = shared_data / "voc12-bench"
    ids = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[:5]
    labels = load_cls_labels(root / "cls_labels.npy", 20)
    cams = tmp_path / "cams"
    for image_id in ids:
        gt = np.array(Image.open(root / "SegmentationClass" / f"{image_id}.png"))
        keys = np.flatnonzero(labels[image_id])
        high_res = np.stack([(gt == k + 1).astype(np.float32) for k in keys])
        write_cam(cams / f"{image_id}.npz", keys, high_res)
    id_list = tmp_path / "ids.txt"
    id_list.write_text("\n".join(ids) + "\n")
    out = tmp_path / "result.json"
    assert main(["--cams", str(cams), "--root", str(root), "--list", str(id_list),
                 "--thresholds", "0.01,0.15,0.5,0.99", "--out", str(out), "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert result["miou"] == [1.0, 1.0, 1.0, 1.0] and result["num_images"] == 5


def test_accuracies_and_the_class_set_of_the_mean(tmp_path, capsys):
    """Issue 13: pixel accuracy, mean class accuracy (VWE utils/pyutils.py) and which classes the mean runs
    over, on a 2 x 3 image worked out by hand. Class 2 is labelled and predicted but absent from the mask."""
    gt = np.array([[0, 1, 1], [0, 0, 255]])
    high_res = np.array([[[0, 1, 0], [0, 0, 0]],  # class 1
                         [[0, 0, 1], [1, 0, 0]]], np.float32)  # class 2
    root, cams = tmp_path / "voc", tmp_path / "cams"
    write_mask(root / "SegmentationClass" / "a.png", gt)
    write_cam(cams / "a.npz", [0, 1], high_res)
    (tmp_path / "ids.txt").write_text("a\n")
    # prediction at 0.15: [[0, 1, 2], [2, 0, -]]; confusion rows gt 0: (2, 0, 1), gt 1: (0, 1, 1), gt 2: 0
    iou = [2 / 3, 1 / 2, 0.0]
    results = {}
    for mean_over in ("union", "ground_truth"):
        out = tmp_path / f"{mean_over}.json"
        assert main(["--cams", str(cams), "--root", str(root), "--list", str(tmp_path / "ids.txt"), "--num-classes",
                     "2", "--thresholds", "0.15", "--out", str(out), "--no-progress", "--mean-over", mean_over]) == 0
        results[mean_over] = json.loads(out.read_text())
    union, present = results["union"]["fixed"], results["ground_truth"]["fixed"]
    assert union["iou"] == pytest.approx(iou)
    assert union["miou"] == pytest.approx(sum(iou) / 3) and present["miou"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    for block in (union, present):  # both class sets are in every result
        assert block["miou_union"] == pytest.approx(7 / 18) and block["miou_ground_truth"] == pytest.approx(7 / 12)
        assert block["pixel_accuracy"] == pytest.approx(3 / 5)
        assert block["mean_class_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)  # class 2 has no gt pixel
    assert results["union"]["mean_over"] == "union" and results["ground_truth"]["mean_over"] == "ground_truth"
    markdown = (tmp_path / "union.md").read_text()
    assert "non-empty union" in markdown and "58.33" in markdown and "--mean-over ground_truth" in markdown
    assert "pixel accuracy 60.00 %" in markdown and "mean class accuracy 58.33 %" in markdown
    assert "classes present in the ground truth" in (tmp_path / "ground_truth.md").read_text()
    assert "pixel accuracy 60.00 %" in capsys.readouterr().out
