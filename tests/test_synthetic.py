"""The synthetic VOC-format data set (lit_wsss.datamodules.synthetic).

Expected values are written out here (VOC colour map entries, class order, id format), not taken from the
module, and the images are checked through their pixels where possible.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lit_wsss.datamodules import synthetic
from lit_wsss.datamodules.synthetic import SYNTHETIC_CLASS_NAMES, generate_synthetic_voc

# First VOC colour-map entries (background, aeroplane, bicycle, bird, boat, bottle) and the void colour.
VOC_COLOURS = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128)]
VOID_COLOUR = (224, 224, 192)
SMALL = {"num_train": 10, "num_val": 4, "image_size": (72, 100)}


@pytest.fixture(scope="module")
def default_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_voc(tmp_path_factory.mktemp("synthetic") / "voc")


def read_split(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def read_labels(root: Path) -> dict[str, np.ndarray]:
    raw = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    out = {}
    for key, vector in raw.items():
        text = str(int(key))
        out[f"{text[:4]}_{text[4:]}"] = vector
    return out


def read_pair(root: Path, image_id: str) -> tuple[np.ndarray, np.ndarray, Image.Image]:
    image = Image.open(root / "JPEGImages" / f"{image_id}.jpg")
    png = Image.open(root / "SegmentationClass" / f"{image_id}.png")
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int32), np.asarray(png), png


def records(root: Path) -> list[dict]:
    return json.loads((root / "synthetic.json").read_text())["images"]


def neighbours4(a: np.ndarray, fill: int) -> list[np.ndarray]:
    p = np.pad(a, 1, constant_values=fill)
    return [p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]


def dilate(a: np.ndarray, r: int) -> np.ndarray:
    p = np.pad(a, r)
    h, w = a.shape
    out = np.zeros_like(a)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def vivid(img: np.ndarray) -> np.ndarray:
    """Strongly saturated, bright pixels: the discriminative parts (bodies and background are muted)."""
    mx, mn = img.max(-1) / 255, img.min(-1) / 255
    return ((mx - mn) / np.maximum(mx, 1e-6) > 0.6) & (mx > 0.45)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_class_names_follow_voc_order() -> None:
    assert SYNTHETIC_CLASS_NAMES[:5] == ("aeroplane", "bicycle", "bird", "boat", "bottle")
    assert len(SYNTHETIC_CLASS_NAMES) == 20 and SYNTHETIC_CLASS_NAMES[-1] == "tvmonitor"


def test_layout_lists_and_irn_label_format(default_set: Path) -> None:
    root = default_set
    train, val = read_split(root, "train"), read_split(root, "val")
    assert len(train) == 240 and len(val) == 48 and not set(train) & set(val)
    assert all(re.fullmatch(r"\d{4}_\d{6}", i) for i in train + val)
    loaded = np.load(root / "cls_labels.npy", allow_pickle=True)
    assert loaded.dtype == object and loaded.shape == ()
    raw = loaded.item()
    assert isinstance(raw, dict) and all(isinstance(k, (int, np.integer)) for k in raw)
    labels = read_labels(root)
    assert set(labels) == set(train + val)
    for vector in labels.values():
        assert vector.dtype == np.float32 and vector.shape == (4,)
        assert set(np.unique(vector)) <= {0.0, 1.0} and vector.sum() >= 1
    meta = json.loads((root / "synthetic.json").read_text())
    assert meta["complete"] is True and meta["class_names"] == ["aeroplane", "bicycle", "bird", "boat"]
    assert not [p for p in root.rglob("*.tmp")]


def test_project_label_reader_accepts_it(default_set: Path) -> None:
    from lit_wsss.datamodules.labels import load_cls_labels

    labels = load_cls_labels(default_set / "cls_labels.npy", num_classes=4)
    assert set(labels) == set(read_split(default_set, "train") + read_split(default_set, "val"))


def test_masks_match_labels_and_have_a_void_band(default_set: Path) -> None:
    root = default_set
    labels = read_labels(root)
    sizes = set()
    for image_id, vector in labels.items():
        img, mask, png = read_pair(root, image_id)
        assert png.mode == "P" and img.shape[:2] == mask.shape
        sizes.add(mask.shape)
        assert all(96 <= s <= 160 for s in mask.shape)
        palette = np.array(png.getpalette()).reshape(-1, 3)
        assert len(palette) == 256 and palette[:5].tolist() == [list(c) for c in VOC_COLOURS[:5]]
        assert tuple(palette[255]) == VOID_COLOUR
        values = set(np.unique(mask).tolist())
        assert values <= {0, 1, 2, 3, 4, 255} and 255 in values and 0 in values
        assert sorted(values - {0, 255}) == (np.flatnonzero(vector) + 1).tolist(), image_id
        # Every class region is wrapped in 255: no class pixel touches background or another class.
        for near in neighbours4(mask, fill=0):
            touching = (mask >= 1) & (mask <= 4) & (near != mask) & (near != 255)
            assert not touching.any(), image_id
        # The band is thin: void pixels lie near class pixels (2 px; up to 4 px at thin tips of a part).
        assert (dilate((mask >= 1) & (mask <= 4), 4) | (mask != 255)).all(), image_id
        assert (mask == 255).sum() < 0.5 * ((mask >= 1) & (mask <= 4)).sum(), image_id
        # Objects stay clearly inside the image.
        border = np.ones_like(mask, bool)
        border[3:-3, 3:-3] = False
        assert not mask[border].any(), image_id
    assert len(sizes) > 50  # variable sizes


def test_real_voc_palette_and_label_types(default_set: Path, shared_data: Path) -> None:
    real_png = next(iter(sorted((shared_data / "voc12-mini" / "SegmentationClass").glob("*.png"))))
    real = Image.open(real_png)
    ours = Image.open(next(iter(sorted((default_set / "SegmentationClass").glob("*.png")))))
    assert ours.mode == real.mode == "P" and ours.getpalette() == real.getpalette()
    real_labels = np.load(shared_data / "voc12" / "cls_labels.npy", allow_pickle=True).item()
    our_labels = np.load(default_set / "cls_labels.npy", allow_pickle=True).item()
    real_key, our_key = next(iter(real_labels)), next(iter(our_labels))
    assert type(our_key) is type(real_key)
    assert our_labels[our_key].dtype == real_labels[real_key].dtype


def test_class_balance_and_object_counts(default_set: Path) -> None:
    labels = read_labels(default_set)
    for split in ("train", "val"):
        ids = read_split(default_set, split)
        matrix = np.stack([labels[i] for i in ids])
        share = matrix.mean(0)
        assert (share >= 0.2).all() and (share <= 0.55).all(), (split, share)
        two = (matrix.sum(1) == 2).mean()
        assert 0.15 <= two <= 0.55 and matrix.sum(1).max() == 2


def test_context_water_correlates_with_the_context_class(default_set: Path) -> None:
    labels = read_labels(default_set)
    meta = {r["id"]: r for r in records(default_set)}
    water = {}
    for image_id in labels:
        img, mask, _ = read_pair(default_set, image_id)
        blue = img[-3:, :, 2] - np.maximum(img[-3:, :, 0], img[-3:, :, 1])  # bottom rows: water or background
        water[image_id] = bool(blue.mean() > 35)
        assert water[image_id] == (meta[image_id]["water"] is not None), image_id
        if water[image_id]:
            assert not mask[-3:].any()  # the water is background
    train = read_split(default_set, "train")
    boat = [i for i in train if labels[i][3] == 1]
    other = [i for i in train if labels[i][3] == 0]
    assert len(boat) >= 40 and len(other) >= 100
    assert np.mean([water[i] for i in boat]) >= 0.75
    assert np.mean([water[i] for i in other]) <= 0.08


def test_discriminative_part_is_small_and_tells_the_class(default_set: Path) -> None:
    part_colour: dict[int, list[np.ndarray]] = {c: [] for c in range(1, 5)}
    body_colour: dict[int, list[np.ndarray]] = {c: [] for c in range(1, 5)}
    areas: dict[int, list[int]] = {c: [] for c in range(1, 5)}
    ratios, in_box = [], []
    for record in records(default_set):
        img, mask, _ = read_pair(default_set, record["id"])
        bright = vivid(img)
        for obj in record["objects"]:
            c = obj["class"]
            region = mask == c
            # Metadata agrees with the pixels: the visible region is the object minus the inner band.
            assert 0.6 * obj["area"] <= region.sum() <= obj["area"]
            assert 0.04 <= obj["part_ratio"] <= 0.12 and obj["part_area"] + obj["body_area"] == obj["area"]
            ratios.append(obj["part_ratio"])
            # The part, seen in pixels: a small vivid patch inside the recorded part box.
            part = bright & region
            assert 0.01 <= part.sum() / region.sum() <= 0.15, record["id"]
            x0, y0, x1, y1 = obj["part_bbox"]
            box = np.zeros_like(region)
            box[max(0, y0 - 2) : y1 + 2, max(0, x0 - 2) : x1 + 2] = True
            assert (part & box).sum() >= 0.7 * part.sum(), record["id"]  # JPEG ringing on bright bodies
            in_box.append((part & box).sum() / part.sum())
            if len(record["objects"]) == 1:
                part_colour[c].append(img[part].mean(0))
                body_colour[c].append(img[region & ~box].mean(0))
                areas[c].append(obj["area"])
    assert 0.06 <= np.mean(ratios) <= 0.09 and np.mean(in_box) >= 0.97
    parts = {c: np.mean(v, 0) for c, v in part_colour.items()}
    bodies = {c: np.mean(v, 0) for c, v in body_colour.items()}
    mean_area = {c: np.mean(v) for c, v in areas.items()}
    overall = np.mean(list(mean_area.values()))
    for a in range(1, 5):
        assert abs(mean_area[a] - overall) <= 0.25 * overall  # body size carries no class information
        for b in range(a + 1, 5):
            assert np.linalg.norm(parts[a] - parts[b]) > 80, (a, b)  # the part's colour tells the class
            assert np.linalg.norm(bodies[a] - bodies[b]) < 40, (a, b)  # the body's colour does not


def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    a = file_bytes(generate_synthetic_voc(tmp_path / "a", seed=5, **SMALL))
    b = file_bytes(generate_synthetic_voc(tmp_path / "b", seed=5, **SMALL))
    c = file_bytes(generate_synthetic_voc(tmp_path / "c", seed=6, **SMALL))
    assert a == b and len(a) == 2 * 14 + 5  # images, masks, 2 lists, labels, json, lock
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != c[k] for k in jpgs) == len(jpgs)
    assert a["synthetic.json"] != c["synthetic.json"]


def test_rerun_is_a_no_op_and_other_parameters_raise(tmp_path: Path) -> None:
    root = generate_synthetic_voc(tmp_path / "voc", **SMALL)
    stats = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    assert generate_synthetic_voc(root, **SMALL) == root
    for other in ({"seed": 1}, {"num_classes": 5}, {"context_prob": 0.5}):
        with pytest.raises(FileExistsError, match="different parameters") as info:
            generate_synthetic_voc(root, **{**SMALL, **other})
        assert str(root) in str(info.value)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()} == stats


def test_foreign_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a synthetic data set"):
        generate_synthetic_voc(tmp_path, **SMALL)
    assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_interrupted_generation_is_finished_on_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = file_bytes(generate_synthetic_voc(tmp_path / "ref", **SMALL))
    real_write = synthetic._write_atomic
    calls = []

    def crash_on_ninth(path: Path, data: bytes) -> None:
        calls.append(path)
        if len(calls) == 9:  # a crash in the middle of writing a file: a half temporary is left behind
            path.with_name(f".{path.name}.999.tmp").write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt("simulated crash")
        real_write(path, data)

    monkeypatch.setattr(synthetic, "_write_atomic", crash_on_ninth)
    root = tmp_path / "voc"
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_voc(root, **SMALL)
    monkeypatch.undo()
    assert json.loads((root / "synthetic.json").read_text())["complete"] is False
    assert not (root / "cls_labels.npy").exists()
    generate_synthetic_voc(root, **SMALL)
    assert file_bytes(root) == reference

    # A lost marker and lost images (e.g. deleted by hand): the rerun rebuilds the same files.
    (root / "synthetic.json").unlink()
    (root / "JPEGImages" / "2000_000003.jpg").unlink()
    generate_synthetic_voc(root, **SMALL)
    assert file_bytes(root) == reference


@pytest.mark.parametrize(
    "bad",
    [{"num_classes": 0}, {"num_classes": 21}, {"context_class": 4}, {"image_size": (40, 60)},
     {"context_prob": 1.5}, {"num_train": 0}],  # fmt: skip
)
def test_invalid_parameters(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ValueError):
        generate_synthetic_voc(tmp_path / "voc", **bad)


def test_more_classes_and_no_context(tmp_path: Path) -> None:
    root = generate_synthetic_voc(
        tmp_path / "voc", num_classes=20, num_train=40, num_val=20, context_class=None
    )
    labels = read_labels(root)
    assert next(iter(labels.values())).shape == (20,)
    assert np.stack(list(labels.values())).sum(0).min() >= 1
    assert all(r["water"] is None for r in records(root))
    for image_id, vector in labels.items():
        _, mask, _ = read_pair(root, image_id)
        assert sorted(set(np.unique(mask).tolist()) - {0, 255}) == (np.flatnonzero(vector) + 1).tolist()
