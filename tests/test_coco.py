"""COCO: category mapping, polygons and RLE against the JSON, mask rules, the DataModule and the CLI."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lit_wsss.cli import main
from lit_wsss.datamodules.files import read_rgb
from lit_wsss.datamodules.coco import (
    COCO_CLASSES,
    COCODataModule,
    annotation_mask,
    build_coco_semantic_masks,
    coco_category_map,
    load_instances,
)
from lit_wsss.stages import configs

# COCO's 80 sparse category ids
COCO_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
CATEGORIES = [{"id": i, "name": n, "supercategory": "x"} for i, n in zip(COCO_IDS, COCO_CLASSES)]
CID = {name: i for i, name in zip(COCO_IDS, COCO_CLASSES)}  # class name -> sparse COCO id
IDX = {name: k + 1 for k, name in enumerate(COCO_CLASSES)}  # class name -> contiguous 1..80


def compress(segmentation):
    """pycocotools' compressed form (string counts) of an uncompressed RLE."""
    h, w = segmentation["size"]
    rle = mask_utils.frPyObjects(segmentation, h, w)
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def ann(ann_id, image_id, name, segmentation, area, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": CID[name], "segmentation": segmentation,
            "area": area, "iscrowd": iscrowd, "bbox": [0, 0, 0, 0]}


# --- a hand-made JSON: every mask value below is computed by hand -------------------------------------------
# Image 1 (8 x 10): dog square x 4..9, y 4..7 (id 1, area 15) listed BEFORE the larger person square
# x 1..7, y 1..7 (id 2, area 36): "later annotation wins" would put the person on top; our rule puts the
# smaller dog on top. A car crowd, uncompressed RLE [0, 16, 64] = the first 16 pixels in column-major
# order = columns 0-1: 255, except where the person square (columns 1..6) lies over it.
# Image 2 (5 x 5): a bottle crowd as a compressed RLE "5:2G5" = runs [5, 10, 2, 1, 7] -> columns 1-2 and pixel
# (row 2, col 3); a cup square x 2..4, y 0..2 over it; a fork (id 12) and a knife (id 13) of equal area 2
# overlapping at (row 3, col 4): the tie goes to the higher id (knife).
# Image 3: no annotation (zero label, left out of the default lists).
TINY_ANNOTATIONS = [
    ann(1, 1, "dog", square(4, 4, 9, 7), 15.0),
    ann(2, 1, "person", square(1, 1, 7, 7), 36.0),
    ann(3, 1, "car", {"counts": [0, 16, 64], "size": [8, 10]}, 16, iscrowd=1),
    ann(10, 2, "bottle", {"counts": "5:2G5", "size": [5, 5]}, 11, iscrowd=1),
    ann(11, 2, "cup", square(2, 0, 4, 2), 4.0),
    ann(12, 2, "fork", square(3, 3, 5, 4), 2.0),
    ann(13, 2, "knife", square(4, 3, 5, 5), 2.0),
]


def expected_tiny_masks():
    one = np.zeros((8, 10), np.uint8)
    one[:, 0:2] = 255
    one[1:7, 1:7] = IDX["person"]
    one[4:7, 4:9] = IDX["dog"]
    two = np.zeros((5, 5), np.uint8)
    two[:, 1:3] = 255
    two[2, 3] = 255
    two[0:2, 2:4] = IDX["cup"]
    two[3, 3:5] = IDX["fork"]
    two[3:5, 4] = IDX["knife"]
    return {"COCO_val2014_000000000001": one, "COCO_val2014_000000000002": two,
            "COCO_val2014_000000000003": np.zeros((6, 7), np.uint8)}


@pytest.fixture
def tiny_root(tmp_path):
    """A COCO-layout root (split val2014) around the hand-made JSON; image 1 is a grey (1-channel) JPEG."""
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "height": h, "width": w}
              for i, (h, w) in ((1, (8, 10)), (2, (5, 5)), (3, (6, 7)))]
    (tmp_path / "annotations").mkdir()
    (tmp_path / "val2014").mkdir()
    data = {"images": images, "annotations": TINY_ANNOTATIONS, "categories": CATEGORIES}
    (tmp_path / "annotations" / "instances_val2014.json").write_text(json.dumps(data))
    rng = np.random.default_rng(0)
    for image in images:
        channels = () if image["id"] == 1 else (3,)  # (H, W) -> mode "L", (H, W, 3) -> "RGB"
        pixels = rng.integers(0, 255, (image["height"], image["width"], *channels), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "val2014" / image["file_name"], quality=95)
    return tmp_path


@pytest.fixture(scope="module")
def mini(shared_data, tmp_path_factory):
    """coco-mini with its derived masks and labels (built once per module)."""
    root = shared_data / "coco-mini"
    cache = tmp_path_factory.mktemp("coco_cache")
    datamodule = make(root, cache)
    datamodule.prepare_data()
    images, by_image, category_map = load_instances(root / "annotations" / "instances_val2017.json")
    return root, cache, datamodule.derived_dir("val2017"), images, by_image, category_map


def make(root, cache, **kwargs):
    defaults = dict(root=str(root), cache_dir=str(cache), train_split="val2017", val_split="val2017",
                    crop_size=64, resize_long=(48, 80), batch_size=2, val_batch_size=2, num_workers=0)
    return COCODataModule(**{**defaults, **kwargs})


# --- category mapping ---------------------------------------------------------------------------------------
def test_category_map_is_contiguous_in_coco_order(tmp_path):
    mapping = coco_category_map(list(reversed(CATEGORIES)), "x.json")  # JSON order does not matter, ids do
    assert sorted(mapping.values()) == list(range(1, 81))
    assert mapping[1] == 1 and mapping[90] == 80 and mapping[13] == 12 and mapping[67] == IDX["dining table"]
    assert COCO_CLASSES[0] == "person" and COCO_CLASSES[-1] == "toothbrush" and len(COCO_CLASSES) == 80


@pytest.mark.parametrize("variant", ["91 ids", "with background", "shuffled", "renamed", "79"])
def test_wrong_category_lists_fail_naming_the_file(tmp_path, variant):
    categories = [dict(c) for c in CATEGORIES]
    if variant == "91 ids":  # torchvision-style 91-entry list, "N/A" in the gaps
        names = dict(zip(COCO_IDS, COCO_CLASSES))
        categories = [{"id": i, "name": names.get(i, "N/A")} for i in range(0, 91)]
    elif variant == "with background":
        categories.insert(0, {"id": 0, "name": "background"})
    elif variant == "shuffled":
        categories[3]["name"], categories[4]["name"] = categories[4]["name"], categories[3]["name"]
    elif variant == "renamed":
        categories[3]["name"] = "motorbike"
    else:
        categories.pop()
    path = tmp_path / f"instances_{variant.replace(' ', '_')}.json"
    path.write_text(json.dumps({"images": [], "annotations": [], "categories": categories}))
    with pytest.raises(ValueError, match=rf"{path.name}: categories are not COCO's 80 classes"):
        load_instances(path)


def test_coco_mini_categories(mini):
    *_, category_map = mini
    assert category_map == coco_category_map(CATEGORIES, "x")


# --- RLE ----------------------------------------------------------------------------------------------------
def test_compressed_rle_equals_the_uncompressed_and_the_hand_drawn_mask():
    # 5 x 5, column-major runs 0s first: 5 zeros (column 0), 10 ones (columns 1-2), 2 zeros, 1 one
    # (row 2, column 3), 7 zeros
    plain = {"counts": [5, 10, 2, 1, 7], "size": [5, 5]}
    drawn = np.zeros((5, 5), bool)
    drawn[:, 1:3] = True
    drawn[2, 3] = True
    compressed = compress(plain)
    assert compressed["counts"] == "5:2G5"  # the string used in TINY_ANNOTATIONS
    for segmentation in (plain, compressed, {**compressed, "counts": compressed["counts"].encode()}):
        mask = annotation_mask(ann(1, 1, "car", segmentation, 11, iscrowd=1), 5, 5)
        assert mask.dtype == bool and mask.shape == (5, 5)
        np.testing.assert_array_equal(mask, drawn)


def test_rle_size_mismatch_names_the_annotation():
    bad = ann(7, 1, "car", {"counts": [0, 16, 63], "size": [8, 10]}, 16, iscrowd=1)
    with pytest.raises(ValueError, match="f.json: annotation 7: RLE of size"):
        annotation_mask(bad, 8, 10, "f.json")
    wrong_size = ann(8, 1, "car", compress({"counts": [0, 16, 64], "size": [8, 10]}), 16, iscrowd=1)
    with pytest.raises(ValueError, match=r"f.json: annotation 8: RLE of size \[8, 10\]"):
        annotation_mask(wrong_size, 10, 8, "f.json")


def test_polygon_checks():
    odd = ann(9, 1, "dog", [[1, 1, 5, 1, 5]], 1.0)
    with pytest.raises(ValueError, match="f.json: annotation 9: polygon with 5 coordinates"):
        annotation_mask(odd, 8, 10, "f.json")
    # parts of fewer than 3 points are skipped (pycocotools would read a 4-number first part as a box)
    degenerate = ann(10, 1, "dog", [[1, 1, 5, 5], [4, 4, 9, 4, 9, 7, 4, 7]], 15.0)
    expected = np.zeros((8, 10), bool)
    expected[4:7, 4:9] = True
    np.testing.assert_array_equal(annotation_mask(degenerate, 8, 10), expected)
    assert not annotation_mask(ann(11, 1, "dog", [[1, 1, 5, 5]], 0.0), 8, 10).any()


def test_coco_mini_crowd_rle(mini):
    """Crowd RLEs decode to exactly their run-length sum of ones, in column-major order (bbox check)."""
    _, _, _, images, by_image, _ = mini
    sizes = {im["id"]: (im["height"], im["width"]) for im in images.values()}
    crowds = [a for anns in by_image.values() for a in anns if a["iscrowd"]]
    assert len(crowds) == 11
    exact = set()
    for a in crowds:
        counts = a["segmentation"]["counts"]
        mask = annotation_mask(a, *sizes[a["image_id"]])
        assert mask.sum() == sum(counts[1::2])
        # pycocotools' RLE bbox is [x_min, y_min, x_max - x_min, y_max - y_min]; row-major decoding fails this
        ys, xs = np.nonzero(mask)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
        # the compressed form of the same runs decodes to the same mask
        as_string = compress(a["segmentation"])
        assert (annotation_mask({**a, "segmentation": as_string}, *sizes[a["image_id"]]) == mask).all()
        assert mask.sum() <= a["area"]
        if mask.sum() == a["area"]:
            exact.add(a["id"])
    # The crowd `area` is NOT the RLE's pixel count on this data: only 3 of 11 agree, the other 8 have a JSON
    # area 1.5 % - 80 % larger than their RLE (e.g. 900100376322: area 12561, RLE 6963 pixels).
    assert exact == {906200491008, 904400357888, 900100005001}


# --- against the COCO API -----------------------------------------------------------------------------------
# pycocotools 2.0.11's Cython decode trips numpy 2's __array__(copy=...) DeprecationWarning (harmless)
NUMPY2_COPY_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"


@pytest.mark.filterwarnings(NUMPY2_COPY_WARNING)
def test_coco_mini_masks_equal_the_coco_api(mini):
    """Every coco-mini annotation (polygons and crowd RLE) equals ``COCO.annToMask``, pixel for pixel.

    ``COCO.annToMask`` goes its own way (``annToRLE`` with the image size from the JSON), so this checks
    the calls, the size handling and the union of parts, not only that pycocotools is used.
    """
    root, _, _, images, by_image, _ = mini
    coco = COCO(str(root / "annotations" / "instances_val2017.json"))
    checked = 0
    for image in images.values():
        for a in by_image[image["id"]]:
            mask = annotation_mask(a, image["height"], image["width"])
            assert mask.dtype == bool and mask.shape == (image["height"], image["width"])
            np.testing.assert_array_equal(mask, coco.annToMask(coco.anns[a["id"]]).astype(bool),
                                          err_msg=str(a["id"]))
            checked += 1
    assert checked == len(coco.anns) == 815  # 804 polygon instances + 11 crowd RLEs


# --- semantic masks -----------------------------------------------------------------------------------------
def test_tiny_json_gives_the_hand_computed_masks(tiny_root, tmp_path):
    out = tmp_path / "out"
    labels = build_coco_semantic_masks(tiny_root / "annotations" / "instances_val2014.json", out)
    for name, expected in expected_tiny_masks().items():
        with Image.open(out / f"{name}.png") as png:
            assert png.mode == "P"
            np.testing.assert_array_equal(np.array(png), expected, err_msg=name)
    on = {name: sorted(COCO_CLASSES[i] for i in np.flatnonzero(v)) for name, v in labels.items()}
    assert on == {"COCO_val2014_000000000001": ["dog", "person"],  # the car crowd is no label
                  "COCO_val2014_000000000002": ["cup", "fork", "knife"],
                  "COCO_val2014_000000000003": []}
    # a rerun skips the complete folder; another JSON under the same folder is refused
    stamp = (out / "COCO_val2014_000000000001.png").stat().st_mtime_ns
    build_coco_semantic_masks(tiny_root / "annotations" / "instances_val2014.json", out)
    assert (out / "COCO_val2014_000000000001.png").stat().st_mtime_ns == stamp
    assert not list(out.glob(".*.tmp*"))
    other = tmp_path / "instances_val2014.json"
    other.write_text((tiny_root / "annotations" / "instances_val2014.json").read_text() + " ")
    with pytest.raises(FileExistsError, match="was built from"):
        build_coco_semantic_masks(other, out)


def test_coco_mini_semantic_masks(mini):
    """Values, crowd = 255 where no instance lies over it, mask size = image size, mask classes = labels."""
    root, _, folder, images, by_image, category_map = mini
    labels = np.load(folder / "cls_labels.npz")
    labels = dict(zip(labels["ids"].tolist(), labels["labels"]))
    occluded = []
    for name, image in images.items():
        with Image.open(folder / f"{name}.png") as png:
            mask = np.array(png)
            assert png.mode == "P"
        with Image.open(root / "val2017" / image["file_name"]) as jpg:
            assert jpg.size == (mask.shape[1], mask.shape[0]) == (image["width"], image["height"])
        assert set(np.unique(mask).tolist()) <= {*range(81), 255}
        h, w = mask.shape
        anns = by_image[image["id"]]
        instances = [(a, annotation_mask(a, h, w)) for a in anns if not a["iscrowd"]]
        covered = np.zeros((h, w), bool)
        for _, region in instances:
            covered |= region
        for a in (a for a in anns if a["iscrowd"]):
            crowd = annotation_mask(a, h, w)
            assert (mask[crowd & ~covered] == 255).all()
            assert ((mask[crowd & covered] > 0) & (mask[crowd & covered] < 255)).all()
        assert ((mask == 255) <= any_crowd(anns, h, w)).all()
        present = set(np.unique(mask).tolist()) - {0, 255}
        labelled = set((np.flatnonzero(labels[name]) + 1).tolist())
        assert present <= labelled
        for cls in labelled - present:  # allowed only if every instance of the class is painted over
            for a, region in instances:
                if category_map[a["category_id"]] == cls:
                    assert (mask[region] != cls).all()
            occluded.append((name, COCO_CLASSES[cls - 1]))
    # A labelled class can vanish only when smaller instances cover all of its instances (e.g. a table under
    # the plates on it) or when its instances are too thin to cover a pixel. On coco-mini none does.
    assert occluded == []


def any_crowd(anns, h, w):
    out = np.zeros((h, w), bool)
    for a in anns:
        if a["iscrowd"]:
            out |= annotation_mask(a, h, w)
    return out


# --- DataModule ---------------------------------------------------------------------------------------------
def test_grey_jpeg_is_read_as_rgb(tiny_root):
    path = tiny_root / "val2014" / "COCO_val2014_000000000001.jpg"
    with Image.open(path) as jpg:
        assert jpg.mode == "L"
    rgb = read_rgb(path)
    assert rgb.shape == (8, 10, 3) and rgb.dtype == np.uint8
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_datamodule_on_the_tiny_root(tiny_root, tmp_path):
    datamodule = make(tiny_root, tmp_path / "cache", train_split="val2014", val_split="val2014", crop_size=16,
                      resize_long=(16, 24))
    with pytest.raises(FileNotFoundError, match="run prepare_data"):
        datamodule.setup("validate")
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.train_dataset.image_ids == ["COCO_val2014_000000000001", "COCO_val2014_000000000002"]
    train = next(iter(datamodule.train_dataloader()))
    assert train["image"].shape == (2, 3, 16, 16) and train["labels"].shape == (2, 80)
    sample = datamodule.val_dataset[0]  # the grey image: 3 channels, its hand-computed mask
    assert sample["image"].shape == (3, 8, 10)
    np.testing.assert_array_equal(sample["mask"].numpy(), expected_tiny_masks()[sample["image_id"]])
    listing = tmp_path / "val_coco.txt"
    # SIPE style: one name a line
    listing.write_text("COCO_val2014_000000000003\nCOCO_val2014_000000000002\n")
    datamodule = make(tiny_root, tmp_path / "cache", train_split="val2014", val_split="val2014",
                      val_list=str(listing))
    datamodule.setup("validate")
    assert datamodule.val_dataset.image_ids == ["COCO_val2014_000000000003", "COCO_val2014_000000000002"]
    listing.write_text("COCO_val2014_000000000099\n")
    with pytest.raises(KeyError, match="val_coco.txt have no label in .*instances_val2014.json"):
        datamodule.setup("validate")


def test_datamodule_batches_on_coco_mini(mini):
    root, cache, *_ = mini
    datamodule = make(root, cache)
    datamodule.prepare_data()  # complete: nothing is rebuilt
    datamodule.setup("fit")
    assert datamodule.num_classes == 80 and datamodule.class_names == COCO_CLASSES
    assert len(datamodule.train_dataset) == 80 and datamodule.train_dataset.image_ids[0] == "000000005001"
    train = next(iter(datamodule.train_dataloader()))
    assert set(train) == {"image", "labels", "image_id", "size"}
    assert train["image"].shape == (2, 3, 64, 64) and train["labels"].shape == (2, 80)
    assert train["labels"].dtype == torch.float32 and (train["labels"].sum(1) >= 1).all()
    assert all(isinstance(i, str) and len(i) == 12 for i in train["image_id"])
    datamodule = make(root, cache)
    datamodule.setup("validate")
    val = next(iter(datamodule.val_dataloader()))
    assert set(val) == {"image", "labels", "image_id", "size", "mask"}
    assert val["mask"].dtype == torch.int64 and val["mask"].shape == (2, *val["image"].shape[-2:])
    assert set(val["mask"].unique().tolist()) <= {*range(81), 255}
    for i, (h, w) in enumerate(val["size"].tolist()):  # padded to the larger image with 255
        assert (val["mask"][i, h:] == 255).all() and (val["mask"][i, :, w:] == 255).all()
        labelled = set((torch.nonzero(val["labels"][i]).flatten() + 1).tolist())
        assert set(val["mask"][i, :h, :w].unique().tolist()) - {0, 255} <= labelled
    protocol = datamodule.protocol()
    assert protocol["ground_truth"] == "masks derived from instances JSON" and protocol["num_classes"] == 80
    assert "smaller on top" in protocol["mask_rules"]["overlap"] and "255" in protocol["mask_rules"]["crowd"]


# --- CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture
def clean_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])  # LightningCLI warns about pytest's own arguments


def config_args():
    return configs("coco", "cam")


def test_print_config(clean_argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args(), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "lit_wsss.datamodules.coco.COCODataModule" in printed and "max_epochs: 5" in printed
    assert "batch_size: 16" in printed


def test_coco_mini_fast_dev_run(clean_argv, mini, tmp_path):
    """Real COCO images and derived masks through the experiments/coco files (resnet18, random init, CPU)."""
    root, cache, *_ = mini
    main([
        "fit", *config_args(),
        "--data.init_args.root", str(root),
        "--data.init_args.cache_dir", str(cache),
        "--data.init_args.train_split", "val2017",
        "--data.init_args.val_split", "val2017",
        "--data.init_args.crop_size", "128",
        "--data.init_args.batch_size", "2",
        "--data.init_args.num_workers", "0",
        "--model.init_args.backbone", "resnet18",
        "--model.init_args.pretrained", "null",
        "--model.init_args.cam_scales", "[1.0]",
        "--trainer.fast_dev_run", "true",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(tmp_path),
    ])
