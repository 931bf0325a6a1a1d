"""PASCAL VOC 2012 for WSSS (../shared/methods/protocol.md §1-§2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lit_wsss.datamodules.base import SegmentationFolderDataset, WSSSDataModule
from lit_wsss.datamodules.files import find_image_folder, find_mask_folder, image_file, read_id_list, resolve_list
from lit_wsss.datamodules.labels import VOC_CLASSES, load_cls_labels, read_class_list
from lit_wsss.errors import MissingDataError


class VOCDataModule(WSSSDataModule):
    """PASCAL VOC 2012 in the devkit layout (``<root>/JPEGImages``, ``<root>/SegmentationClass[Aug]``).

    Args:
        root: ``VOCdevkit/VOC2012`` (or any folder with that layout, e.g. ``../shared/data/voc12-mini``).
        train_list: training split: a list file, or a name resolved in ``<root>/ImageSets/Segmentation``
            then ``<root>``. IRN trains on ``train_aug`` (10582 ids; not part of the devkit, pass the file).
        val_list: split scored during training; CAM quality is reported on ``train`` (1464), protocol.md §1.2.
        predict_list: split exported by ``lit-wsss predict``; defaults to ``val_list``.
        cls_labels: image-level labels: lit_wsss JSON / CSV (``lit_wsss.datamodules.labels``), the official
            ``cls_labels.npy`` (int or str keys) or our ``.npz``; a relative path not found as given is looked up
            under ``root``. Default ``<root>/cls_labels.json``, else ``<root>/cls_labels.npy``.
        mask_dir: ground-truth folder under ``root``: ``SegmentationClass`` (what IRN/SIPE/CPN evaluate
            against), ``SegmentationClassAug``, or ``auto`` (the first that exists, in that order).
        **kwargs: the loader and augmentation arguments of :class:`WSSSDataModule` (``crop_size``,
            ``resize_long``, ``train_transform``, ``seed_dir``, ``batch_size``, ``val_batch_size``,
            ``num_workers``); its defaults are IRN's.
        classes: class list file (one foreground name per line, under ``root`` if relative); default VOC's 20.
        image_dir: image folder (a path or a name under ``root``; ``auto``: ``JPEGImages``, else ``images``).
            An id's image is ``<id>.jpg``, else ``<id>`` with another image suffix.
    """

    def __init__(
        self,
        root: str,
        train_list: str = "train_aug",
        val_list: str = "train",
        predict_list: str | None = None,
        cls_labels: str | None = None,
        mask_dir: str = "SegmentationClass",
        classes: str | None = None,
        image_dir: str = "JPEGImages",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        # Read from attributes, not self.hparams: under LightningCLI a subclass's hparams hold only its own
        # config keys (e.g. SyntheticVOCDataModule sets the lists itself).
        self.root = Path(root)
        self.train_list = train_list
        self.val_list = val_list
        self.predict_list = predict_list or val_list
        self.cls_labels_path = (self.under_root(cls_labels) if cls_labels else
                                next((p for p in (self.root / "cls_labels.json", self.root / "cls_labels.npy")
                                      if p.is_file()), self.root / "cls_labels.npy"))
        self.mask_dir = mask_dir
        self.image_dir = image_dir
        self.classes_path = self.under_root(classes) if classes else None
        self.class_names = read_class_list(self.classes_path) if self.classes_path else VOC_CLASSES
        self.num_classes = len(self.class_names)
        self._labels: dict | None = None

    def under_root(self, name: str) -> Path:
        """``name`` as given when it exists or is absolute, else ``<root>/<name>``."""
        path = Path(name)
        return path if path.is_absolute() or path.exists() else self.root / path

    def mask_folder(self) -> Path:
        """The ground-truth folder actually used (``auto``: SegmentationClass, else SegmentationClassAug)."""
        return find_mask_folder(self.root, self.mask_dir)

    def image_labels(self) -> dict:
        """The image-level labels, read once."""
        if self._labels is None:
            self._labels = load_cls_labels(self.cls_labels_path, self.num_classes, class_names=self.class_names)
        return self._labels

    def voc_dataset(
        self, ids: list[str], ids_source: Any, train: bool, mask_paths: list[Path] | None = None
    ) -> SegmentationFolderDataset:
        """``ids`` of ``<root>/JPEGImages`` with their labels (and masks), checked by ``folder_dataset``."""
        folder = find_image_folder(self.root, self.image_dir)
        images = [image_file(folder, i, missing_ok=True) for i in ids]  # folder_dataset names the missing
        return self.folder_dataset(
            ids, images, self.image_labels(), train=train, mask_paths=mask_paths, ids_source=ids_source,
            labels_source=self.cls_labels_path,
        )

    def _dataset(self, list_name: str, with_masks: bool, train: bool) -> SegmentationFolderDataset:
        list_path = resolve_list(self.root, list_name)
        ids = read_id_list(list_path)
        masks = None
        if with_masks:
            folder = self.mask_folder()
            masks = [folder / f"{i}.png" for i in ids]
        return self.voc_dataset(ids, list_path, train, masks)

    def setup(self, stage: str) -> None:
        if not self.root.is_dir():
            raise MissingDataError(f"VOC root not found: {self.root} (data.root)")
        if stage == "fit":
            self.train_dataset = self._dataset(self.train_list, with_masks=False, train=True)
        if stage in ("fit", "validate"):
            self.val_dataset = self._dataset(self.val_list, with_masks=True, train=False)
        if stage == "test":
            raise ValueError("VOC test masks are not public; use `validate` with data.val_list")
        if stage == "predict":
            self.predict_dataset = self._dataset(self.predict_list, with_masks=False, train=False)

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        record.update(
            root=str(self.root),
            train_list=self.train_list,
            val_list=self.val_list,
            predict_list=self.predict_list,
            cls_labels=str(self.cls_labels_path),
            ground_truth=self.mask_dir,
            classes=str(self.classes_path) if self.classes_path else "VOC 2012",
            image_dir=self.image_dir,
        )
        return record
