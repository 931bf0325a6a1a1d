"""CAM -> IR labels (lit_wsss.refine.ir_labels; ../shared/methods/protocol.md §6.1, §11 item 5;
sipe.md §5.3; cpn.md §7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lit_wsss.datamodules.synthetic import generate_synthetic_voc
from lit_wsss.io import save_npz_atomic, write_json_atomic
from lit_wsss.refine.ir_labels import CRF_PARAMS, crf_inference_label, ir_label, main, make_ir_labels


def identity_crf(image: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    assert labels.max() < n_labels
    return labels


def row_image(width: int) -> np.ndarray:
    return np.zeros((1, width, 3), np.uint8)


# ----------------------------------------------------------------------------------------------- combination


def test_constant_one_class_hand_worked() -> None:
    # class index 4 -> label 5; planes 0.30 (fg map) and 0.05 (bg map); a tie goes to the plane
    cams = np.array([[[0.9, 0.5, 0.31, 0.30, 0.1, 0.0]]], np.float32)
    label = ir_label(row_image(6), cams, np.array([4]), crf=identity_crf)
    # fg map:  5 5 5 0 0 0 ; bg map: 5 5 5 5 5 0
    assert label.dtype == np.uint8
    assert label.tolist() == [[5, 5, 5, 255, 255, 0]]


def test_constant_two_classes_hand_worked() -> None:
    cams = np.array([
        [[0.8, 0.2, 0.6, 0.04, 0.0, 0.20]],   # key 0  -> label 1
        [[0.1, 0.9, 0.6, 0.03, 0.0, 0.25]],   # key 14 -> label 15
    ], np.float32)  # fmt: skip
    label = ir_label(row_image(6), cams, np.array([0, 14]), 0.30, 0.05, crf=identity_crf)
    # fg map (0.30): 1 15 1 0 0 0   (pixel 2: tie between classes -> the first)
    # bg map (0.05): 1 15 1 0 0 15
    assert label.tolist() == [[1, 15, 1, 0, 0, 255]]


def test_fg_wins_bg_only_where_both_say_background() -> None:
    """Spec §11 item 5 with a scripted CRF: the two CRF maps may disagree arbitrarily."""
    cams = np.array([[[0.9, 0.5, 0.2, 0.1, 0.0, 0.4]], [[0.1, 0.6, 0.0, 0.01, 0.0, 0.2]]], np.float32)
    calls = []
    scripted = [np.array([[1, 2, 0, 0, 2, 0]]), np.array([[0, 0, 0, 1, 2, 2]])]  # fg map, then bg map

    def crf(image: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
        calls.append((labels.tolist(), n_labels))
        return scripted[len(calls) - 1]

    label = ir_label(row_image(6), cams, np.array([0, 14]), crf=crf)
    # the CRF receives compact indices over [plane, cam_1, cam_2] with K + 1 labels
    assert calls == [([[1, 2, 0, 0, 0, 1]], 3), ([[1, 2, 1, 1, 0, 1]], 3)]
    # keys' = (0, 1, 15): fg = 1 15 0 0 15 0 ; bg = 0 0 0 1 15 15
    assert label.tolist() == [[1, 15, 0, 255, 15, 255]]


def test_explicit_convention_halves_the_background() -> None:
    """SIPE (sipe.md §5.3): fg map = argmax [bg, cams]; bg map = argmax [0.5 bg, cams]."""
    bg = np.array([[0.9, 0.6, 0.5, 0.4, 0.2, 0.5]], np.float32)
    cams = np.array([[[0.1, 0.5, 0.5, 0.3, 0.8, 0.25]]], np.float32)  # key 2 -> label 3
    label = ir_label(row_image(6), cams, np.array([2]), bg=bg, convention="explicit", crf=identity_crf)
    # fg map (bg):      0 0 0 0 3 0   (pixel 2: tie -> background)
    # bg map (0.5 bg):  0 3 3 3 3 0   (0.45 0.30 0.25 0.20 0.10 0.25; pixel 5: tie -> background)
    assert label.tolist() == [[0, 255, 255, 255, 3, 0]]
    # without halving both maps agree: no uncertain pixels
    same = ir_label(row_image(6), cams, np.array([2]), bg=bg, convention="explicit", crf=identity_crf,
                    bg_factor=1.0)
    assert same.tolist() == [[0, 0, 0, 0, 3, 0]]


def test_cpn_convention_undoes_the_halving() -> None:
    """CPN (cpn.md §7): halved maps x2 against unit-scale planes; a tie goes to the plane."""
    cams = np.array([[[0.45, 0.2, 0.15, 0.1, 0.02, 0.0]]], np.float32)  # key 0 -> label 1
    label = ir_label(row_image(6), cams, np.array([0]), 0.4, 0.1, convention="cpn", crf=identity_crf)
    # doubled: 0.9 0.4 0.3 0.2 0.04 0 ; fg map (0.4): 1 0 0 0 0 0 ; bg map (0.1): 1 1 1 1 0 0
    assert label.tolist() == [[1, 255, 255, 255, 0, 0]]
    # the same as 'constant' on the unit-scale maps
    unit = ir_label(row_image(6), cams * 2, np.array([0]), 0.4, 0.1, crf=identity_crf)
    assert unit.tolist() == label.tolist()


def reference_label(fg_scores: np.ndarray, bg_scores: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """§6.1 written the official way: np.argmax over stacked score arrays (background first)."""
    lookup = np.concatenate([[0], keys + 1])
    fg, bg = lookup[fg_scores.argmax(0)], lookup[bg_scores.argmax(0)]
    label = fg.copy()
    label[fg == 0] = 255
    label[(fg == 0) & (bg == 0)] = 0
    return label


def test_matches_stacked_argmax_on_random_maps_with_ties() -> None:
    rng = np.random.default_rng(0)
    keys = np.array([3, 7, 19])
    image = np.zeros((8, 9, 3), np.uint8)
    for _ in range(20):
        cams = (rng.integers(0, 21, (3, 8, 9)) / 20).astype(np.float32)  # a 0.05 grid: ties everywhere
        bg = (rng.integers(0, 21, (8, 9)) / 20).astype(np.float32)
        plane = np.ones((1, 8, 9), np.float32)
        expected = reference_label(np.concatenate([plane * np.float32(0.3), cams]),
                                   np.concatenate([plane * np.float32(0.05), cams]), keys)
        assert np.array_equal(ir_label(image, cams, keys, crf=identity_crf), expected)
        # SIPE: the bg channel at full strength, then halved (sipe.md §5.3)
        expected = reference_label(np.concatenate([bg[None], cams]),
                                   np.concatenate([np.float32(0.5) * bg[None], cams]), keys)
        label = ir_label(image, cams, keys, bg=bg, convention="explicit", crf=identity_crf)
        assert np.array_equal(label, expected)
        # sipe.md §10 item 8: halved-map background ⊆ full-map background; 255 exactly where they disagree
        full_bg = bg >= cams.max(0)
        halved_bg = 0.5 * bg >= cams.max(0)
        assert not (halved_bg & ~full_bg).any()
        assert np.array_equal(label == 255, full_bg & ~halved_bg)


def test_convention_misuse_is_refused() -> None:
    image, cams, keys = row_image(2), np.full((1, 1, 2), 0.4, np.float32), np.array([0])
    bg = np.zeros((1, 2), np.float32)
    with pytest.raises(ValueError, match="explicit"):
        ir_label(image, cams, keys, bg=bg, crf=identity_crf)  # constant with a bg map
    with pytest.raises(ValueError, match="bg map"):
        ir_label(image, cams, keys, convention="explicit", crf=identity_crf)
    with pytest.raises(ValueError, match="do not pass"):
        ir_label(image, cams, keys, 0.3, bg=bg, convention="explicit", crf=identity_crf)
    with pytest.raises(ValueError, match="explicit fg and bg thresholds"):
        ir_label(image, cams, keys, convention="cpn", crf=identity_crf)
    with pytest.raises(ValueError, match="halved"):
        ir_label(image, cams + 0.5, keys, 0.4, 0.1, convention="cpn", crf=identity_crf)
    with pytest.raises(ValueError, match="unknown background convention"):
        ir_label(image, cams, keys, convention="power", crf=identity_crf)


def test_no_foreground_keys_is_all_background() -> None:
    def crf(*args: object) -> np.ndarray:
        raise AssertionError("the CRF must not run with a single label")

    empty = np.zeros((0, 3, 4), np.float32)
    label = ir_label(np.zeros((3, 4, 3), np.uint8), empty, np.zeros(0, np.int64), crf=crf)
    assert label.shape == (3, 4) and not label.any()


# --------------------------------------------------------------------------------------------------- real CRF


def test_crf_snaps_to_the_colour_edge() -> None:
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = (200, 30, 30)
    image[:, 20:] = (30, 30, 200)
    spilled = np.zeros((20, 40), np.int64)
    spilled[:, :26] = 1  # 6 columns over the edge
    out = crf_inference_label(image, spilled, 2)
    assert out.shape == (20, 40)
    assert int((out == 1).sum()) == 400 and (out[:, :20] == 1).all()
    short = np.zeros((20, 40), np.int64)
    short[:, :15] = 1  # 5 columns short of the edge
    assert int((crf_inference_label(image, short, 2) == 1).sum()) == 400

    # through ir_label with the real CRF: the confident class fills its colour region, the rest is background
    cams = np.zeros((1, 20, 40), np.float32)
    cams[0, :, :26] = 0.9
    label = ir_label(image, cams, np.array([6]))
    assert int((label == 7).sum()) == 400 and int((label == 0).sum()) == 400


# --------------------------------------------------------------------------------------------------- stage


def write_cams_from_masks(root: Path, ids: list[str], out: Path) -> dict[str, int]:
    """CAMs from the ground truth: one blurred one-hot map per labelled class (max-normalised)."""
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for image_id in ids:
        mask = np.array(Image.open(root / "SegmentationClass" / f"{image_id}.png"))
        classes = [c for c in np.unique(mask).tolist() if c not in (0, 255)]
        maps = []
        for c in classes:
            blurred = cv2.GaussianBlur((mask == c).astype(np.float32), (0, 0), 3.0)
            maps.append(blurred / (blurred.max() + 1e-5))
        height, width = mask.shape
        high_res = np.stack(maps) if maps else np.zeros((0, height, width), np.float32)
        strided = high_res[:, ::4, ::4]
        save_npz_atomic(out / f"{image_id}.npz", keys=np.array(classes, np.int64) - 1, high_res=high_res,
                        cam=np.ascontiguousarray(strided))
        images[image_id] = {"num_classes": len(classes), "size": [height, width]}
    write_json_atomic(out / "manifest.json", {
        "producer": "test", "checkpoint": None, "protocol": {"cam": {"bg_threshold": 0.15}},
        "bg_threshold": 0.15, "count": len(images), "images": images,
    })
    return {i: images[i]["num_classes"] for i in ids}


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    base = tmp_path_factory.mktemp("ir")
    root = generate_synthetic_voc(base / "voc", num_train=4, num_val=4, seed=0)
    ids = [line for name in ("train", "val")
           for line in (root / "ImageSets" / "Segmentation" / f"{name}.txt").read_text().split()]
    cams = base / "cams"
    write_cams_from_masks(root, ids, cams)
    return root, ids, cams


def png_values(path: Path) -> np.ndarray:
    with Image.open(path) as png:
        assert png.mode == "P"
        return np.array(png)


def test_stage_end_to_end(voc: tuple[Path, list[str], Path], tmp_path: Path) -> None:
    root, ids, cams = voc
    one = make_ir_labels(cams, root, ids, tmp_path / "one", workers=1, progress=False)
    two = make_ir_labels(cams, root, ids, tmp_path / "two", workers=2, progress=False)
    assert one["written"] == two["written"] == len(ids) and one["skipped"] == 0
    confident = correct = 0
    for image_id in ids:
        a, b = tmp_path / "one" / f"{image_id}.png", tmp_path / "two" / f"{image_id}.png"
        assert a.read_bytes() == b.read_bytes()
        label = png_values(a)
        assert set(np.unique(label).tolist()) <= {*range(5), 255}  # synthetic: C = 4
        gt = np.array(Image.open(root / "SegmentationClass" / f"{image_id}.png"))
        assert label.shape == gt.shape
        keep = (label != 255) & (gt != 255)
        confident += int(keep.sum())
        correct += int((label[keep] == gt[keep]).sum())
    assert correct / confident > 0.9  # CAMs built from the masks: the confident part is mostly right

    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["stage"] == "ir-labels" and manifest["complete"] is True
    assert manifest["cams"] == str(cams.resolve())
    assert manifest["cams_manifest"]["producer"] == "test" and "images" not in manifest["cams_manifest"]
    assert manifest["cams_producer"] == "test"
    assert manifest["cams_protocol"] == {"cam": {"bg_threshold": 0.15}}
    assert manifest["convention"] == "constant"
    assert (manifest["fg_threshold"], manifest["bg_threshold"], manifest["bg_factor"]) == (0.30, 0.05, None)
    assert manifest["crf"] == json.loads(json.dumps(CRF_PARAMS))
    assert manifest["crf"]["bilateral"] == {"sxy": 50, "srgb": 5, "compat": 10}
    assert manifest["count"] == len(ids) and manifest["ids"] == ids

    # rerun: every PNG is skipped and left untouched; leftovers of a killed run are removed
    stamps = {i: (tmp_path / "one" / f"{i}.png").stat().st_mtime_ns for i in ids}
    leftover = tmp_path / "one" / f".{ids[0]}.png.123.tmp"
    leftover.write_bytes(b"half")
    again = make_ir_labels(cams, root, ids, tmp_path / "one", workers=1, progress=False)
    assert (again["written"], again["skipped"]) == (0, len(ids))
    assert {i: (tmp_path / "one" / f"{i}.png").stat().st_mtime_ns for i in ids} == stamps
    assert not leftover.exists()

    # a deleted PNG is redone, with the same bytes
    before = (tmp_path / "one" / f"{ids[1]}.png").read_bytes()
    (tmp_path / "one" / f"{ids[1]}.png").unlink()
    redo = make_ir_labels(cams, root, ids, tmp_path / "one", workers=1, progress=False)
    assert (redo["written"], redo["skipped"]) == (1, len(ids) - 1)
    assert (tmp_path / "one" / f"{ids[1]}.png").read_bytes() == before

    # other parameters into the same folder: refused (naming the keys) unless overwrite
    with pytest.raises(FileExistsError, match="fg_threshold"):
        make_ir_labels(cams, root, ids, tmp_path / "one", fg=0.4, workers=1, progress=False)
    again = make_ir_labels(cams, root, ids[:2], tmp_path / "one", fg=0.4, workers=1, progress=False,
                           overwrite=True)
    assert again["written"] == 2
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["fg_threshold"] == 0.4 and manifest["ids"] == ids[:2]
    assert sorted(p.stem for p in (tmp_path / "one").glob("*.png")) == sorted(ids[:2])  # no stale labels
    # a later list with the same parameters adds to the folder: the manifest lists both
    more = make_ir_labels(cams, root, ids[1:4], tmp_path / "one", fg=0.4, workers=1, progress=False)
    assert (more["written"], more["skipped"]) == (2, 1)
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["ids"] == ids[:4] and manifest["count"] == 4

    # PNGs without a manifest have unknown parameters: refused
    (tmp_path / "one" / "manifest.json").unlink()
    with pytest.raises(FileExistsError, match="no manifest.json"):
        make_ir_labels(cams, root, ids[:1], tmp_path / "one", fg=0.4, workers=1, progress=False)


def test_stage_errors_name_the_files(voc: tuple[Path, list[str], Path], tmp_path: Path) -> None:
    root, ids, cams = voc
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        make_ir_labels(cams, root, [ids[0], "nope"], tmp_path / "a", workers=1, progress=False)
    with pytest.raises(ValueError, match="repeats"):
        make_ir_labels(cams, root, [ids[0], ids[0]], tmp_path / "a", workers=1, progress=False)
    # a CAM of the wrong size
    bad = tmp_path / "bad_cams"
    bad.mkdir()
    save_npz_atomic(bad / f"{ids[0]}.npz", keys=np.array([0]), high_res=np.zeros((1, 7, 9), np.float32),
                    cam=np.zeros((1, 2, 3), np.float32))
    shutil.copy(cams / f"{ids[1]}.npz", bad / f"{ids[1]}.npz")
    for workers in (1, 2):  # the error crosses the process boundary intact
        with pytest.raises(ValueError, match=rf"size mismatch.*{ids[0]}\.jpg.*{ids[0]}\.npz"):
            make_ir_labels(bad, root, ids[:2], tmp_path / f"b{workers}", workers=workers, progress=False)
    # an explicit-bg file under the constant convention
    with np.load(cams / f"{ids[0]}.npz") as data:
        arrays = dict(data)
    sipe = tmp_path / "sipe_cams"
    sipe.mkdir()
    save_npz_atomic(sipe / f"{ids[0]}.npz", **arrays, bg=1 - arrays["high_res"].max(0, initial=0.0))
    with pytest.raises(ValueError, match=rf"{ids[0]}\.npz.*explicit"):
        make_ir_labels(sipe, root, [ids[0]], tmp_path / "c", workers=1, progress=False)
    out = make_ir_labels(sipe, root, [ids[0]], tmp_path / "d", convention="explicit", workers=1,
                         progress=False)
    assert out["written"] == 1
    manifest = json.loads((tmp_path / "d" / "manifest.json").read_text())
    assert manifest["convention"] == "explicit"
    assert (manifest["bg_factor"], manifest["fg_threshold"], manifest["bg_threshold"]) == (0.5, None, None)


def test_console_entry(
    voc: tuple[Path, list[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, ids, cams = voc
    out = tmp_path / "cli"
    args = ["--cams", str(cams), "--root", str(root), "--list", "val", "--fg", "0.30", "--bg", "0.05",
            "--out", str(out), "--workers", "1", "--no-progress"]
    assert main(args) == 0
    val = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(val)
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"ir-labels: {len(val)} written, 0 skipped") and "images/s" in line
    assert main(args) == 0
    assert f"0 written, {len(val)} skipped" in capsys.readouterr().out

    assert main([*args, "--fg", "0.5"]) == 1  # other parameters into the same folder (last --fg wins)
    err = capsys.readouterr().err
    assert err.startswith("ir-labels: error:") and "fg_threshold" in err
    assert main(["--cams", str(tmp_path / "missing"), "--root", str(root), "--list", "val", "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 1
    assert "CAM folder not found" in capsys.readouterr().err
    assert main(["--cams", str(cams), "--root", str(root), "--list", "val", "--out", str(tmp_path / "y"),
                 "--convention", "cpn", "--no-progress"]) == 1
    assert "cpn" in capsys.readouterr().err
    swapped = tmp_path / "swapped"  # fg below bg (issue 17): refused before anything is written
    assert main(["--cams", str(cams), "--root", str(root), "--list", "val", "--fg", "0.05", "--bg", "0.30",
                 "--out", str(swapped), "--no-progress"]) == 1
    assert "fg threshold 0.05 is below bg threshold 0.3" in capsys.readouterr().err
    assert not swapped.exists()
