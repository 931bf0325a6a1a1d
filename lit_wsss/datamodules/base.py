"""Datasets, collation and the base DataModule shared by VOC, COCO and the synthetic set (style.md P5).

Batches are dicts (``Batch``): ``image`` (B, 3, H, W) normalised, ``labels`` (B, C) multi-hot float,
``image_id`` list of str, ``size`` (B, 2) original (H, W) and, on evaluation splits, ``mask`` (B, H, W)
int64 with 255 = ignore. Evaluation batches of several images are padded (image 0, mask 255).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any, TypedDict

import albumentations as A
import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_wsss.datamodules.files import read_mask, read_rgb
from lit_wsss.datamodules.transforms import build_train_transform, inference
from lit_wsss.errors import MissingDataError, TrainingDataError, UnlabelledIdsError
from lit_wsss.io import IGNORE_INDEX


class Batch(TypedDict, total=False):
    image: Tensor
    labels: Tensor
    image_id: list[str]
    size: Tensor
    mask: Tensor


class SegmentationFolderDataset(Dataset):
    """Images + image-level labels (+ masks) of a list of ids in a VOC-style folder.

    Args:
        image_paths: one image file per id.
        labels: multi-hot float32 vector per id.
        transform: albumentations pipeline ending in ``ToTensorV2``.
        mask_paths: one PNG per id, or ``None`` for training splits.
        num_classes: foreground classes (mask values are checked against it).
    """

    def __init__(
        self,
        image_ids: list[str],
        image_paths: list[Path],
        labels: dict[str, np.ndarray],
        transform: A.Compose,
        num_classes: int,
        mask_paths: list[Path] | None = None,
    ) -> None:
        self.image_ids = image_ids
        self.image_paths = image_paths
        self.labels = labels
        self.transform = transform
        self.num_classes = num_classes
        self.mask_paths = mask_paths

    def __len__(self) -> int:
        return len(self.image_ids)

    def select(self, keep: set[str]) -> SegmentationFolderDataset:
        """The same dataset restricted to the ids in ``keep`` (list order preserved)."""
        index = [i for i, image_id in enumerate(self.image_ids) if image_id in keep]
        return SegmentationFolderDataset(
            [self.image_ids[i] for i in index],
            [self.image_paths[i] for i in index],
            self.labels,
            self.transform,
            self.num_classes,
            None if self.mask_paths is None else [self.mask_paths[i] for i in index],
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        image_id = self.image_ids[index]
        image = read_rgb(self.image_paths[index])
        inputs = {"image": image}
        if self.mask_paths is not None:
            inputs["mask"] = read_mask(self.mask_paths[index], image.shape[:2], self.num_classes)
        out = self.transform(**inputs)
        sample = {
            "image": out["image"],
            "labels": torch.from_numpy(self.labels[image_id]),
            "image_id": image_id,
            "size": torch.tensor(out["image"].shape[-2:]),
        }
        if self.mask_paths is not None:
            sample["mask"] = torch.as_tensor(out["mask"], dtype=torch.long)
        for key in out.keys() - {"image", "mask"}:  # extras of a method's named transform (e.g. SIPE's valid)
            sample[key] = out[key]
        return sample


def pad_collate(samples: list[dict[str, Any]]) -> Batch:
    """Stack samples, padding images with 0 (the mean colour after normalisation) and masks with 255."""
    height = max(s["image"].shape[-2] for s in samples)
    width = max(s["image"].shape[-1] for s in samples)
    batch: dict[str, Any] = {
        "image": torch.stack([_pad(s["image"], height, width, 0.0) for s in samples]),
        "labels": torch.stack([s["labels"] for s in samples]),
        "image_id": [s["image_id"] for s in samples],
        "size": torch.stack([s["size"] for s in samples]),
    }
    if "mask" in samples[0]:
        batch["mask"] = torch.stack([_pad(s["mask"], height, width, IGNORE_INDEX) for s in samples])
    for key in samples[0].keys() - batch.keys():  # per-image extras of varying shape (e.g. CAMs) stay lists
        batch[key] = [s[key] for s in samples]
    return batch  # type: ignore[return-value]


def _pad(tensor: Tensor, height: int, width: int, value: float) -> Tensor:
    pad_h, pad_w = height - tensor.shape[-2], width - tensor.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, pad_w, 0, pad_h), value=value)


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """Give every loader worker (and rank) its own augmentation stream, reproducibly.

    albumentations' ``Compose`` keeps a private generator that ignores global seeds and is copied into
    every worker, which would make all workers draw identical augmentations.
    """
    seed = (torch.initial_seed() + 7919 * rank) % 2**32  # torch seeds workers with base_seed + worker_id
    random.seed(seed)
    np.random.seed(seed)
    info = torch.utils.data.get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


class WSSSDataModule(pl.LightningDataModule):
    """Base of every data set: loaders, batch sizes, worker seeding and the protocol record.

    Subclasses set ``num_classes`` and ``class_names`` in ``__init__`` and build ``train_dataset``,
    ``val_dataset`` and ``predict_dataset`` in ``setup``.

    Args:
        batch_size: training images per process; the effective batch is
            ``batch_size x devices x num_nodes x accumulate_grad_batches``.
        val_batch_size: evaluation images per process (variable sizes are padded).
        num_workers: loader workers per process.
        crop_size: training crop (IRN 512).
        resize_long: range of the random long side before cropping (IRN 320..640).
        train_transform: named training pipeline (``lit_wsss.datamodules.transforms``).
        seed_dir: pixel pseudo masks (``<id>.png``: 0 background, c+1 class c, 255 ignore) for the TRAINING
            images, cropped and flipped with them as ``mask`` (GSLM's seeds, cls.md §2.4); ``None``: image
            labels only.
        allow_empty_labels: train on images whose label vector has no foreground class. A multi-label
            classifier on VOC or COCO never sees one, so by default such an image in a training list is an
            error naming the ids (most likely a broken label file).
    """

    num_classes: int
    class_names: tuple[str, ...]

    def __init__(
        self,
        batch_size: int = 16,
        val_batch_size: int = 1,
        num_workers: int = 4,
        crop_size: int = 512,
        resize_long: tuple[int, int] = (320, 640),
        train_transform: str = "irn_cls",
        seed_dir: str | None = None,
        allow_empty_labels: bool = False,
    ) -> None:
        super().__init__()
        self.allow_empty_labels = allow_empty_labels
        self.seed_dir = Path(seed_dir) if seed_dir else None
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.crop_size = crop_size
        self.resize_long = tuple(resize_long)
        self.train_transform = train_transform
        self.train_dataset: SegmentationFolderDataset | None = None
        self.val_dataset: SegmentationFolderDataset | None = None
        self.predict_dataset: SegmentationFolderDataset | None = None

    def folder_dataset(
        self,
        ids: list[str],
        image_paths: list[Path],
        labels: dict[str, np.ndarray],
        *,
        train: bool,
        mask_paths: list[Path] | None = None,
        ids_source: Any = "",
        labels_source: Any = "",
    ) -> SegmentationFolderDataset:
        """A dataset over ``ids`` after checking that every id has a label and an image file.

        ``ids_source`` / ``labels_source`` name the list and the label file in the error messages.
        """
        missing = [i for i in ids if i not in labels]
        if missing:
            raise UnlabelledIdsError(f"{len(missing)} ids of {ids_source} have no label in {labels_source}, "
                                     f"e.g. {missing[:5]}")
        empty = [i for i in ids if not np.any(labels[i])] if train and not self.allow_empty_labels else []
        if empty:
            raise TrainingDataError(
                f"{len(empty)} of {len(ids)} training images of {ids_source} have no foreground class in "
                f"{labels_source}, e.g. {empty[:5]}; a multi-label classifier is never trained on such an image, "
                "so the label file is most likely broken. Fix it, drop the ids from the list, or set "
                "data.init_args.allow_empty_labels=true"
            )
        absent = [p for p in image_paths if not p.is_file()]
        if absent:
            raise MissingDataError(
                f"{len(absent)} images of {ids_source} are missing, e.g. {[str(p) for p in absent[:3]]}"
            )
        if train and self.seed_dir is not None and mask_paths is None:
            mask_paths = [self.seed_dir / f"{i}.png" for i in ids]
            lacking = [p for p in mask_paths if not p.is_file()]
            if lacking:
                raise MissingDataError(f"{len(lacking)} training ids of {ids_source} have no pseudo mask in "
                                       f"seed_dir {self.seed_dir}, e.g. {[str(p) for p in lacking[:3]]}")
        transform = (
            build_train_transform(self.train_transform, self.crop_size, self.resize_long) if train else inference()
        )
        return SegmentationFolderDataset(ids, image_paths, labels, transform, self.num_classes, mask_paths)

    @property
    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _loader(self, dataset: Dataset | None, stage: str, **kwargs: Any) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}: no {stage} dataset; was setup() called for this stage?")
        transform = getattr(dataset, "transform", None)
        if self.num_workers == 0 and hasattr(transform, "set_random_seed"):
            transform.set_random_seed((torch.initial_seed() + 7919 * self._rank) % 2**32)
        return DataLoader(
            dataset,
            num_workers=self.num_workers,
            collate_fn=pad_collate,
            worker_init_fn=functools.partial(seed_worker, rank=self._rank),
            persistent_workers=False,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        # IRN drops the last incomplete batch (its max_step = len(dataset) // batch * epochs).
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.train_dataset is not None and len(self.train_dataset) < self.batch_size * world_size:
            raise TrainingDataError(
                f"the training list has {len(self.train_dataset)} images, fewer than one batch "
                f"(data.init_args.batch_size={self.batch_size} x {world_size} processes); the last incomplete "
                "batch is dropped (IRN), so nothing would train: lower the batch size or list more images")
        return self._loader(self.train_dataset, "train", batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        # Never drop or repeat evaluation images: under DDP every image is scored exactly once.
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = UnrepeatedDistributedSampler(self.val_dataset, shuffle=False)
        return self._loader(self.val_dataset, "val", batch_size=self.val_batch_size, sampler=sampler)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_dataset, "predict", batch_size=self.val_batch_size)

    def protocol(self) -> dict[str, Any]:
        """Data-side facts a result depends on (extended by subclasses)."""
        return {
            "datamodule": type(self).__name__,
            "num_classes": self.num_classes,
            "batch_size": self.batch_size,
            "crop_size": self.crop_size,
            "resize_long": list(self.resize_long),
            "train_transform": self.train_transform,
            "seed_dir": str(self.seed_dir) if self.seed_dir else None,
            "allow_empty_labels": self.allow_empty_labels,
        }
