"""Data of the IRN stages (../shared/methods/protocol.md §6): IR labels for training, CAMs for the random walk.

Both inputs are producer folders with a ``manifest.json`` (style.md P8): ``ir_label_dir`` from
``lit-wsss ir-labels`` and ``cam_dir`` from ``lit-wsss predict`` + ``CAMWriter``. Their manifests are read and
checked, never a folder by convention.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lit_wsss.cam_files import cam_path, read_cam_file, read_cam_manifest
from lit_wsss.datamodules.base import SegmentationFolderDataset
from lit_wsss.datamodules.files import read_id_list, resolve_list
from lit_wsss.datamodules.labels import VOC_CLASSES
from lit_wsss.datamodules.voc import VOCDataModule
from lit_wsss.errors import MissingDataError
from lit_wsss.io import read_manifest


class CAMInputDataset(Dataset):
    """Images (inference transform) plus each image's stride-4 CAMs and keys from a CAM folder.

    A file with its own background map (SIPE) also yields ``bg_cam``: ``bg`` bilinearly downsampled to the
    ``cam`` grid, as SIPE's ``make_seg_labels.py`` downsamples every IS-CAM channel (sipe.md §5.4, S13).
    """

    def __init__(self, images: SegmentationFolderDataset, cam_dir: Path) -> None:
        self.images = images
        self.cam_dir = cam_dir
        self.image_ids = images.image_ids

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.images[index]
        cams = read_cam_file(cam_path(self.cam_dir, sample["image_id"]), ("cam", "keys", "bg"))
        sample["cam"] = torch.from_numpy(cams["cam"].astype(np.float32))
        sample["keys"] = torch.from_numpy(cams["keys"].astype(np.int64))
        if "bg" in cams:
            bg = torch.from_numpy(cams["bg"].astype(np.float32))[None, None]
            sample["bg_cam"] = F.interpolate(bg, tuple(sample["cam"].shape[-2:]), mode="bilinear",
                                             align_corners=False)[0, 0]
        return sample

    def select(self, keep: set[str]) -> CAMInputDataset:
        return CAMInputDataset(self.images.select(keep), self.cam_dir)


class IRNDataModule(VOCDataModule):
    """VOC-layout images with IR labels (fit) or CAMs (predict) for :class:`~lit_wsss.modules.IRN`.

    Args:
        root: VOC-layout root of the images (and ``cls_labels``), as for :class:`VOCDataModule`.
        ir_label_dir: output of ``lit-wsss ir-labels`` (training targets); its ids are the training list
            unless ``train_list`` is given.
        num_classes: foreground classes of the images' label file (default: the ``classes`` list's, else VOC's
            20; the synthetic set fewer, named after VOC's first classes).
        classes, image_dir: a folder data set's class list and image folder (:class:`VOCDataModule`).
        cam_dir: output of the CAM predict stage; its ids are the pseudo-label list unless ``predict_list``
            is given. IRN walks the stride-4 ``cam`` arrays (pitfall P5).
        crop_size: IRNet training crop (512); the path index is built for ``crop_size / 4``.
        batch_size: IRN uses 32.
        Other arguments: see :class:`VOCDataModule`.
    """

    def __init__(
        self,
        root: str,
        ir_label_dir: str | None = None,
        cam_dir: str | None = None,
        train_list: str | None = None,
        predict_list: str | None = None,
        cls_labels: str | None = None,
        num_classes: int | None = None,
        classes: str | None = None,
        image_dir: str = "JPEGImages",
        crop_size: int = 512,
        batch_size: int = 32,
        val_batch_size: int = 1,
        num_workers: int = 4,
    ) -> None:
        super().__init__(
            root=root, train_list=train_list or "train", val_list="train", predict_list=predict_list,
            cls_labels=cls_labels, crop_size=crop_size, train_transform="irn_affinity", batch_size=batch_size,
            val_batch_size=val_batch_size, num_workers=num_workers, classes=classes, image_dir=image_dir,
        )
        if classes is None:
            self.class_names = VOC_CLASSES[: num_classes or len(VOC_CLASSES)]
        elif num_classes is not None and num_classes != len(self.class_names):
            raise ValueError(f"data.init_args.num_classes={num_classes} but {self.classes_path} lists "
                             f"{len(self.class_names)} classes")
        self.num_classes = len(self.class_names)
        self.ir_label_dir = Path(ir_label_dir) if ir_label_dir else None
        self.cam_dir = Path(cam_dir) if cam_dir else None
        self._explicit_train_list = train_list
        self._explicit_predict_list = predict_list

    def _ids(self, explicit: str | None, manifest: dict[str, Any], folder: Path) -> tuple[list[str], Any]:
        """An explicit list, else the ids the producer's manifest lists (``ids`` or ``images``)."""
        if explicit:
            path = resolve_list(self.root, explicit)
            return read_id_list(path), path
        ids = manifest.get("ids") or sorted(manifest.get("images", {}))
        if not ids:
            raise ValueError(f"{folder / 'manifest.json'} lists no ids (neither 'ids' nor 'images')")
        return list(ids), folder / "manifest.json"

    def setup(self, stage: str) -> None:
        if not self.root.is_dir():
            raise MissingDataError(f"image root not found: {self.root} (data.root)")
        if stage == "fit":
            if self.ir_label_dir is None:
                raise ValueError("IRN training needs data.init_args.ir_label_dir (output of `lit-wsss ir-labels`)")
            manifest = read_manifest(self.ir_label_dir, "IR labels", required=True)
            ids, source = self._ids(self._explicit_train_list, manifest, self.ir_label_dir)
            masks = [self.ir_label_dir / f"{i}.png" for i in ids]
            self.train_dataset = self.voc_dataset(ids, source, train=True, mask_paths=masks)
        if stage == "predict":
            if self.cam_dir is None:
                raise ValueError("pseudo labels need data.init_args.cam_dir (output of the CAM predict stage)")
            manifest = read_cam_manifest(self.cam_dir, required=True)
            ids, source = self._ids(self._explicit_predict_list, manifest, self.cam_dir)
            self.predict_dataset = CAMInputDataset(self.voc_dataset(ids, source, train=False), self.cam_dir)
        if stage in ("validate", "test"):
            raise ValueError("IRN is scored through its pseudo labels: run predict with "
                             "experiments/stages/pseudo_labels.yaml, then `lit-wsss eval-cam` on that folder")

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        record.update(ir_label_dir=str(self.ir_label_dir), cam_dir=str(self.cam_dir))
        for name, folder in (("ir_labels", self.ir_label_dir), ("cams", self.cam_dir)):
            upstream = read_manifest(folder) if folder is not None else {}
            if upstream:
                record[f"{name}_producer"] = {k: upstream.get(k) for k in ("stage", "producer", "checkpoint")}
        return record
