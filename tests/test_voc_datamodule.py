"""VOC DataModule: the real folder layout, protocol.md §2 augmentation, and errors that name the bad file."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lit_wsss.datamodules import VOCDataModule
from lit_wsss.datamodules.synthetic import generate_synthetic_voc
from lit_wsss.datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    """A small VOC-layout folder (4 of the 20 VOC classes occur; label vectors padded to 20)."""
    root = tmp_path_factory.mktemp("voc") / "VOC2012"
    generate_synthetic_voc(root, num_classes=4, num_train=6, num_val=3, image_size=(64, 96), seed=3)
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    padded = {int(k): np.concatenate([v, np.zeros(16, np.float32)]) for k, v in labels.items()}
    np.save(root / "cls_labels.npy", padded)
    return root


def copy_root(voc_root, tmp_path):
    target = tmp_path / "VOC2012"
    shutil.copytree(voc_root, target)
    return target


def make(root, **kwargs):
    defaults = dict(root=str(root), train_list="train", val_list="val", crop_size=64, resize_long=(48, 80),
                    batch_size=2, val_batch_size=2, num_workers=0)
    return VOCDataModule(**{**defaults, **kwargs})


def test_batches(voc_root):
    datamodule = make(voc_root)
    datamodule.setup("fit")
    train = next(iter(datamodule.train_dataloader()))
    assert train["image"].shape == (2, 3, 64, 64) and train["labels"].shape == (2, 20)
    assert isinstance(train["image_id"][0], str) and "mask" not in train
    val = next(iter(datamodule.val_dataloader()))
    assert val["mask"].dtype == torch.int64 and set(val["mask"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    # padded to the larger image: image 0 (= mean colour), mask 255 outside each image's own size
    for i, (h, w) in enumerate(val["size"].tolist()):
        assert (val["mask"][i, h:, :] == 255).all() and (val["mask"][i, :, w:] == 255).all()
        assert (val["image"][i, :, h:, :] == 0).all()
    # the val image is the whole image, normalised with ImageNet statistics
    image_id, (h, w) = val["image_id"][0], val["size"][0].tolist()
    rgb = np.array(Image.open(voc_root / "JPEGImages" / f"{image_id}.jpg").convert("RGB"), np.float32) / 255
    expected = (rgb - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    assert np.allclose(val["image"][0, :, :h, :w].permute(1, 2, 0).numpy(), expected, atol=0.05)


def test_small_images_are_padded_with_zero_at_a_random_offset(voc_root):
    datamodule = make(voc_root, crop_size=128, resize_long=(64, 64))
    datamodule.setup("fit")
    image = datamodule.train_dataset[0]["image"]
    assert image.shape == (3, 128, 128)
    # the 64-px-long image covers at most half of each side; the rest is exactly the mean colour (0)
    zero_rows = (image.abs().sum((0, 2)) == 0).sum().item()
    assert zero_rows >= 64


def test_list_formats_and_missing_list(voc_root, tmp_path):
    ids = (voc_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    sipe_style = tmp_path / "val_sipe.txt"
    sipe_style.write_text("".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids))
    datamodule = make(voc_root, val_list=str(sipe_style))
    datamodule.setup("validate")
    assert datamodule.val_dataset.image_ids == ids
    with pytest.raises(FileNotFoundError, match="no_such_split"):
        make(voc_root, val_list="no_such_split").setup("validate")
    with pytest.raises(FileNotFoundError, match="not_a_root"):
        make(tmp_path / "not_a_root").setup("validate")


def test_unknown_label_key_names_the_id_and_the_file(voc_root, tmp_path):
    root = copy_root(voc_root, tmp_path)
    listing = root / "ImageSets" / "Segmentation" / "val.txt"
    listing.write_text(listing.read_text() + "2000_999999\n")
    with pytest.raises(KeyError, match=r"val.txt have no label in .*cls_labels.npy.*2000_999999"):
        make(root).setup("validate")


def test_corrupt_image_and_bad_masks_name_the_file(voc_root, tmp_path):
    root = copy_root(voc_root, tmp_path)
    first, second, third = (root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()[:3]
    (root / "JPEGImages" / f"{first}.jpg").write_bytes(b"not a jpeg")
    mask = np.array(Image.open(root / "SegmentationClass" / f"{second}.png"))
    Image.fromarray(mask[:-3]).save(root / "SegmentationClass" / f"{second}.png")  # wrong size
    wrong_values = np.array(Image.open(root / "SegmentationClass" / f"{third}.png"))
    wrong_values[0, 0] = 30
    Image.fromarray(wrong_values).save(root / "SegmentationClass" / f"{third}.png")
    datamodule = make(root)
    datamodule.setup("validate")
    with pytest.raises(OSError, match=f"{first}.jpg"):
        datamodule.val_dataset[0]
    with pytest.raises(ValueError, match=f"{second}.png.*width x height"):
        datamodule.val_dataset[1]
    with pytest.raises(ValueError, match=rf"{third}.png holds values \[30\]"):
        datamodule.val_dataset[2]


def test_missing_mask_folder(voc_root, tmp_path):
    root = copy_root(voc_root, tmp_path)
    shutil.rmtree(root / "SegmentationClass")
    with pytest.raises(FileNotFoundError, match="SegmentationClass"):
        make(root).setup("validate")
    with pytest.raises(FileNotFoundError, match="no SegmentationClass or SegmentationClassAug"):
        make(root, mask_dir="auto").setup("validate")
