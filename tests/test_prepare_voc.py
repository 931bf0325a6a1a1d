"""``lit-wsss prepare voc``: SegmentationClassAug, train_aug.txt and cls_labels.json from a tiny VOC2012 + SBD."""

import json

import numpy as np
import pytest
from PIL import Image

from lit_wsss.datamodules.labels import VOC_CLASSES
from lit_wsss.prepare import prepare_voc

H, W = 12, 16
A, B, C, D, E, F = "2007_000001", "2007_000002", "2007_000003", "2008_000004", "2008_000005", "2009_000006"
VOC_TRAIN, VOC_VAL = [A, B], [C]
SBD_TRAIN, SBD_VAL = [B, D, F], [C, E]
# objects of each XML (F has none: its labels come from its mask); A's person is difficult, D's car truncated
XML_OBJECTS = {A: [("dog", 0, 0), ("person", 1, 0)], B: [("cat", 0, 0), ("cat", 0, 0)], C: [("aeroplane", 0, 0)],
               D: [("bus", 0, 0), ("car", 0, 1)], E: [("horse", 0, 0)]}


def voc_mask(value: int) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[3:9, 4:12] = value
    mask[3, 4:12] = mask[8, 4:12] = 255  # object boundary
    return mask


def sbd_mask(*values: int, shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for k, value in enumerate(values):
        mask[k * 2:k * 2 + 2, :] = value
    return mask


def write_mat(path, mask):
    import scipy.io

    scipy.io.savemat(path, {"GTcls": {"Segmentation": mask, "Boundaries": np.zeros(1, np.uint8),
                                      "CategoriesPresent": np.unique(mask[mask > 0]).astype(np.uint8)}})


VOC_MASKS = {A: voc_mask(12), B: voc_mask(8), C: voc_mask(1)}
# B and C have both: VOC's wins; D, E, F only SBD
SBD_MASKS = {B: sbd_mask(3), C: sbd_mask(4), D: sbd_mask(6, 7), E: sbd_mask(13), F: sbd_mask(7, 15)}


def build(tmp_path):
    devkit, sbd = tmp_path / "VOCdevkit" / "VOC2012", tmp_path / "benchmark_RELEASE"
    for sub in ("JPEGImages", "SegmentationClass", "Annotations", "ImageSets/Segmentation"):
        (devkit / sub).mkdir(parents=True)
    (sbd / "dataset" / "cls").mkdir(parents=True)
    for image_id in (A, B, C, D, E, F):
        Image.new("RGB", (W, H), (90, 120, 30)).save(devkit / "JPEGImages" / f"{image_id}.jpg")
    for image_id, mask in VOC_MASKS.items():
        image = Image.fromarray(mask, mode="P")
        image.putpalette([0, 0, 0] * 256)
        image.save(devkit / "SegmentationClass" / f"{image_id}.png")
    for image_id, objects in XML_OBJECTS.items():
        body = "".join(f"<object><name>{n}</name><difficult>{d}</difficult><truncated>{t}</truncated></object>"
                       for n, d, t in objects)
        (devkit / "Annotations" / f"{image_id}.xml").write_text(f"<annotation><filename>{image_id}.jpg</filename>"
                                                                f"{body}</annotation>")
    (devkit / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (devkit / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_VAL) + "\n")
    for image_id, mask in SBD_MASKS.items():
        write_mat(sbd / "dataset" / "cls" / f"{image_id}.mat", mask)
    (sbd / "dataset/train.txt").write_text("\n".join(SBD_TRAIN) + "\n")
    (sbd / "dataset/val.txt").write_text("\n".join(SBD_VAL) + "\n")
    return devkit, sbd


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "P"
        return np.asarray(image)


def test_prepare_voc_builds_aug_masks_lists_and_labels(tmp_path):
    devkit, sbd = build(tmp_path)
    manifest = prepare_voc(devkit, sbd, check_counts=False)
    aug = devkit / "SegmentationClassAug"
    assert sorted(p.stem for p in aug.iterdir()) == [A, B, C, D, E, F]
    assert not list(aug.glob(".*"))  # no temporary files left
    for image_id in (A, B, C):  # VOC's own mask, pixel-exact, borders kept
        out = read_png(aug / f"{image_id}.png")
        assert np.array_equal(out, VOC_MASKS[image_id]) and (out == 255).sum() == 16
    for image_id in (D, E, F):
        assert np.array_equal(read_png(aug / f"{image_id}.png"), SBD_MASKS[image_id])
    # (SBD train ∪ SBD val ∪ VOC train) − VOC val
    assert (devkit / "ImageSets/Segmentation/train_aug.txt").read_text().split() == [A, B, D, E, F]
    labels = json.loads((devkit / "cls_labels.json").read_text())
    assert labels == {A: ["dog", "person"], B: ["cat"], C: ["aeroplane"], D: ["bus", "car"], E: ["horse"],
                      F: ["car", "person"]}  # F: from its SBD mask (7 = car, 15 = person)
    assert all(name in VOC_CLASSES for names in labels.values() for name in names)
    written = json.loads((devkit / "prepare_voc.json").read_text())
    assert written["counts"] == {"train_aug": 5, "voc_train": 2, "voc_val": 1, "sbd_train": 3, "sbd_val": 2,
                                 "masks": 6, "labels": 6}
    assert written["masks"] == {"from_voc": 3, "from_sbd": 3}
    assert written["labels"] == {"from_xml": 5, "from_mask": 1}
    assert manifest["skipped_existing"] == 0


def test_rerun_writes_nothing_new(tmp_path):
    devkit, sbd = build(tmp_path)
    out = tmp_path / "out"
    prepare_voc(devkit, sbd, out=out, check_counts=False)
    assert not (devkit / "SegmentationClassAug").exists()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 6 + 3
    before = {p: p.stat().st_mtime_ns for p in files}
    manifest = prepare_voc(devkit, sbd, out=out, check_counts=False)
    assert manifest["skipped_existing"] == 6
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_count_check_fails_without_no_count_check(tmp_path, capsys):
    from lit_wsss.cli import main

    devkit, sbd = build(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "voc", "--devkit", str(devkit), "--sbd", str(sbd)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "train_aug" in err and "10582" in err and "has 5" in err and "--no-count-check" in err
    assert not (devkit / "SegmentationClassAug").exists()  # checked before anything is written
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "voc", "--devkit", str(devkit), "--sbd", str(sbd), "--no-count-check"])
    assert exit_info.value.code == 0
    assert "train_aug 5" in capsys.readouterr().out


def test_missing_sbd_folder_names_the_path(tmp_path):
    devkit, _ = build(tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="SBD cls folder not found") as error:
        prepare_voc(devkit, missing, check_counts=False)
    assert str(missing / "dataset" / "cls") in str(error.value)
    (devkit / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        prepare_voc(devkit, tmp_path / "benchmark_RELEASE", check_counts=False)


def test_size_mismatch_and_bad_mat_name_the_files(tmp_path):
    devkit, sbd = build(tmp_path)
    mat = sbd / "dataset" / "cls" / f"{D}.mat"
    write_mat(mat, sbd_mask(6, shape=(H + 1, W)))
    with pytest.raises(ValueError) as error:
        prepare_voc(devkit, sbd, check_counts=False)
    assert str(mat) in str(error.value) and str(devkit / "JPEGImages" / f"{D}.jpg") in str(error.value)
    import scipy.io

    scipy.io.savemat(mat, {"other": np.zeros((H, W), np.uint8)})
    with pytest.raises(ValueError, match="GTcls.Segmentation") as error:
        prepare_voc(devkit, sbd, check_counts=False)
    assert str(mat) in str(error.value)
