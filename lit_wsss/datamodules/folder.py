"""A data set of the user's own: a folder of images, a label file, a class list, optional masks.

Layout (every name can be changed in the config; the file stages of the chain, ``eval-cam``, ``ir-labels`` and
``eval-seg``, find ``images/`` and ``masks/`` by these default names)::

    <root>/images/<id>.<jpg|png|...>   any file names; the id is the name without its suffix (unique)
    <root>/classes.txt                 one foreground class name per line (mask value = line number)
    <root>/labels.csv                  columns image,labels (names separated by ';'), or labels.json
                                       {"<id>": ["cat", "dog"]} (lit_wsss.datamodules.labels)
    <root>/masks/<id>.png              optional, for evaluation: 0 background, 1..C the classes, 255 ignore
    <root>/train.txt, <root>/val.txt   optional split lists, one id (or file name) per line

Without a list, training uses every labelled image and evaluation every labelled image with a mask.
"""

from __future__ import annotations

from typing import Any

from lit_wsss.datamodules.base import SegmentationFolderDataset
from lit_wsss.datamodules.voc import VOCDataModule
from lit_wsss.errors import MissingDataError


class FolderDataModule(VOCDataModule):
    """Images + image-level labels (+ masks) of a custom data set, read by the VOC code path.

    Args:
        root: the data set folder (module doc).
        labels: label file, CSV or JSON (relative: under ``root``).
        classes: class list file (relative: under ``root``).
        image_dir: image folder (relative: under ``root``).
        mask_dir: mask folder for evaluation (relative: under ``root``).
        train_list, val_list: split lists (a path or a name under ``root``); ``None``: every labelled image
            (training) / every labelled image with a mask (evaluation).
        predict_list: split exported by ``lit-wsss predict``; defaults to ``val_list``.
        **kwargs: the loader and augmentation arguments of :class:`~lit_wsss.datamodules.base.WSSSDataModule`.
    """

    def __init__(
        self,
        root: str,
        labels: str = "labels.csv",
        classes: str = "classes.txt",
        image_dir: str = "images",
        mask_dir: str = "masks",
        train_list: str | None = "train",
        val_list: str | None = "val",
        predict_list: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, train_list=train_list, val_list=val_list, predict_list=predict_list,
                         cls_labels=labels, mask_dir=mask_dir, classes=classes, image_dir=image_dir, **kwargs)

    def _dataset(self, list_name: str | None, with_masks: bool, train: bool) -> SegmentationFolderDataset:
        if list_name is not None:
            return super()._dataset(list_name, with_masks, train)
        ids = sorted(self.image_labels())
        masks = None
        if with_masks:
            folder = self.mask_folder()
            ids = [i for i in ids if (folder / f"{i}.png").is_file()]
            if not ids:
                raise MissingDataError(f"no labelled image of {self.cls_labels_path} has a mask in {folder}")
            masks = [folder / f"{i}.png" for i in ids]
        return self.voc_dataset(ids, f"every labelled image of {self.cls_labels_path}", train, masks)

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        record["ground_truth"] = str(self.mask_folder()) if (self.root / self.mask_dir).is_dir() else None
        return record
