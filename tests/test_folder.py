"""A folder data set of the user's own (lit_wsss/datamodules/folder.py): any image names and suffixes, CSV or JSON
labels by class name, optional masks; read by the DataModule, the CLI configs (DATA=folder) and ir-labels."""

import sys

import numpy as np
import pytest
from PIL import Image

from lit_wsss.cli import main
from lit_wsss.datamodules.files import find_image_folder, image_file
from lit_wsss.datamodules.folder import FolderDataModule
from lit_wsss.io import palette_png_bytes
from lit_wsss.stages import configs

CLASSES = ["sky thing", "ground thing"]


@pytest.fixture
def folder(tmp_path):
    """Four images: 'a' JPEG, 'b.c' PNG (a dot in the name), 'd' JPEG without mask, 'e' PNG; masks by hand."""
    root = tmp_path / "my data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    masks = {}
    for name, suffix in (("a", ".jpg"), ("b.c", ".png"), ("d", ".jpg"), ("e", ".png")):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "images" / f"{name}{suffix}")
        mask = np.zeros((40, 60), np.uint8)
        mask[:10] = 1
        mask[30:] = 2 if name != "e" else 0
        masks[name] = mask
        if name != "d":
            (root / "masks" / f"{name}.png").write_bytes(palette_png_bytes(mask))
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "labels.csv").write_text("image,labels\na.jpg,sky thing;ground thing\nb.c.png,sky thing;ground thing\n"
                                     "d.jpg,ground thing\ne.png,sky thing\n")
    (root / "train.txt").write_text("a.jpg\nd.jpg\n")
    (root / "val.txt").write_text("b.c\ne\n")
    return root, masks


def test_image_lookup_by_stem_any_suffix(folder):
    root, _ = folder
    images = find_image_folder(root)
    assert images == root / "images"
    assert image_file(images, "b.c").name == "b.c.png" and image_file(images, "a").name == "a.jpg"
    with pytest.raises(FileNotFoundError, match=r"no image for id 'zz' in .*images"):
        image_file(images, "zz")
    with pytest.raises(FileNotFoundError, match="expected JPEGImages/ or images/"):
        find_image_folder(root / "masks")


def test_datamodule_lists_labels_and_masks(folder):
    root, masks = folder
    dm = FolderDataModule(root=str(root), num_workers=0, crop_size=32, resize_long=(32, 48), batch_size=2)
    assert dm.class_names == tuple(CLASSES) and dm.num_classes == 2
    dm.setup("fit")
    assert dm.train_dataset.image_ids == ["a", "d"]
    assert dm.val_dataset.image_ids == ["b.c", "e"]
    sample = dm.val_dataset[1]
    assert sample["labels"].tolist() == [1.0, 0.0]
    assert np.array_equal(sample["mask"].numpy(), masks["e"])
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 3, 32, 32)
    # without lists: every labelled image for training, every labelled image with a mask for evaluation
    dm = FolderDataModule(root=str(root), train_list=None, val_list=None, num_workers=0)
    dm.setup("fit")
    assert dm.train_dataset.image_ids == ["a", "b.c", "d", "e"]
    assert dm.val_dataset.image_ids == ["a", "b.c", "e"]
    assert dm.protocol()["classes"] == str(root / "classes.txt")


def test_bad_folder_inputs_name_the_file(folder):
    root, _ = folder
    (root / "labels.csv").write_text("image,labels\na.jpg,cloud\n")
    with pytest.raises(ValueError, match=r"labels.csv: line 2: unknown class 'cloud'"):
        FolderDataModule(root=str(root), num_workers=0).setup("fit")
    with pytest.raises(FileNotFoundError, match="class list not found: .*nope.txt"):
        FolderDataModule(root=str(root), classes="nope.txt")
    (root / "labels.csv").write_text("image,labels\na.jpg,sky thing\n")
    with pytest.raises(KeyError, match=r"1 ids of .*train.txt have no label in .*labels.csv, e.g. \['d'\]"):
        FolderDataModule(root=str(root), num_workers=0).setup("fit")


def test_folder_configs_fast_dev_run(folder, tmp_path, monkeypatch):
    """experiments/folder/_base.yaml + the CAM method file on the folder (resnet18, random init, CPU)."""
    root, _ = folder
    monkeypatch.setattr(sys, "argv", ["lit-wsss"])
    main(["fit", *configs("folder", "cam"), "--data.init_args.root", str(root),
          "--data.init_args.crop_size", "32", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
          "--model.init_args.backbone", "resnet18", "--model.init_args.pretrained", "null",
          "--model.init_args.cam_scales", "[1.0]", "--trainer.fast_dev_run", "true", "--trainer.accelerator", "cpu",
          "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)])
