"""MS COCO 2014 for WSSS (../shared/methods/protocol.md §1.4), ground truth derived from the instances JSON.

Layout: ``<root>/<split>/<file_name>`` and ``<root>/annotations/instances_<split>.json`` (the official
COCO 2014 and 2017 layout; ``../shared/data/coco-mini`` is split ``val2017``). Ids are file stems
(``COCO_train2014_000000000009``). ``prepare_data`` writes, per instances JSON,
``<cache_dir>/<json stem>/``: ``<id>.png`` semantic masks, ``cls_labels.npz`` and ``.complete.json``.

Mask rules (``MASK_RULES``):

- Classes: COCO category ids (1..90, sparse) map to 1..80 in id order, checked against ``COCO_CLASSES``.
- Polygons and RLE are decoded by ``pycocotools.mask``, COCO's official decoder, so the masks are the same
  as in every COCO toolkit (``COCO.annToMask``, detectron2, mmdetection): polygons go through
  ``frPyObjects(polygons, h, w)``, ``merge`` (the parts of one annotation are united) and ``decode``;
  uncompressed RLE (``counts`` list) through ``frPyObjects``; compressed RLE (string counts) is decoded as
  is. An RLE ``size`` must equal the image's ``[height, width]``. Polygons of fewer than 3 points are
  skipped (they enclose no pixel); an odd number of coordinates is an error. An earlier hand-written
  rasteriser (version 1) approximated pycocotools' pixel convention; it is replaced to remove that doubt.
- Overlaps: crowd regions (``iscrowd=1``) are painted first as 255, then the non-crowd instances from the
  largest JSON ``area`` to the smallest, so smaller instances end on top (ties: the higher annotation id
  on top), the order of the common converter alicranck/coco2voc. Annotators outline a large object such
  as a table or a bed round the small objects on it, so "largest first" keeps those small objects.
  Crowd regions are coarse blobs that often take in outlined instances of other classes: on coco-mini a
  person crowd covers a whole handbag and a wine-glass crowd covers several cups almost completely. An
  outlined instance is therefore trusted over a crowd, and 255 is left only where no instance is.
- Image labels: multi-hot over the 80 classes of the non-crowd annotations (crowd-only classes are not
  labels: they have no scorable pixel). Then the classes in a mask are exactly its labels, unless every
  instance of a class is covered by smaller ones or is too thin to cover a pixel.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from tqdm import tqdm

from lit_wsss.datamodules.base import SegmentationFolderDataset, WSSSDataModule
from lit_wsss.datamodules.files import read_id_list, resolve_list
from lit_wsss.datamodules.labels import load_cls_labels, save_cls_labels_npz
from lit_wsss.errors import DataFileError, MissingDataError, UnlabelledIdsError
from lit_wsss.io import IGNORE_INDEX
from lit_wsss.io import palette_png_bytes, write_bytes_atomic

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
"""Classes 1..80 (0 = background) in COCO category id order, as SIPE's ``data/labels_coco.txt``."""

MASK_RULES: dict[str, str] = {
    "version": "2",
    "polygon": "masks decoded by pycocotools 2.0.11 (frPyObjects, merge, decode; its pixel convention)",
    "overlap": "larger JSON area painted first, smaller on top; ties: higher annotation id on top",
    "crowd": "iscrowd=1 painted 255 first, non-crowd instances over it",
    "labels": "multi-hot of the non-crowd annotations' classes",
}
MARKER = ".complete.json"


def coco_category_map(categories: list[dict[str, Any]], source: str | Path) -> dict[int, int]:
    """Sparse COCO category id -> contiguous 1..80, after checking the list is COCO's 80 classes in order."""
    ordered = sorted(categories, key=lambda c: c["id"])
    names = tuple(c["name"] for c in ordered)
    if names != COCO_CLASSES:
        pairs = zip(names, COCO_CLASSES)
        wrong = next((f"class {i + 1} is {a!r}, not {b!r}" for i, (a, b) in enumerate(pairs) if a != b), "")
        raise DataFileError(
            f"{source}: categories are not COCO's 80 classes in id order ({len(names)} categories; "
            f"{wrong or 'different length'}); sparse category ids must map to 1..80, not index classes"
        )
    return {c["id"]: i + 1 for i, c in enumerate(ordered)}


def annotation_mask(ann: dict[str, Any], height: int, width: int, source: str | Path = "") -> np.ndarray:
    """Bool (H, W) mask of one annotation (polygons, uncompressed or compressed RLE), by pycocotools.mask.

    Raises:
        ValueError: naming the annotation, for an RLE whose ``size`` is not ``[height, width]`` (or whose
            uncompressed runs do not cover the image) and for a polygon with an odd number of coordinates.
    """
    where = f"{source}: annotation {ann.get('id')}"
    segmentation = ann["segmentation"]
    if isinstance(segmentation, list):
        polygons = []
        for poly in segmentation:
            if len(poly) % 2:
                raise DataFileError(f"{where}: polygon with {len(poly)} coordinates (expected x, y pairs)")
            # fewer than 3 points enclose no area; pycocotools would also read a 4-coordinate first entry
            # as a bounding box, so degenerate parts are skipped rather than passed on
            if len(poly) >= 6:
                polygons.append([float(v) for v in poly])
        if not polygons:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    else:
        if list(segmentation["size"]) != [height, width]:
            raise DataFileError(f"{where}: RLE of size {segmentation['size']} does not fit the "
                                f"{height}x{width} (height x width) image")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            runs = np.asarray(counts, dtype=np.int64)
            if runs.sum() != height * width or (runs < 0).any():  # pycocotools does not check this
                raise DataFileError(f"{where}: RLE of size {segmentation['size']} with {runs.sum()} counted "
                                    f"pixels does not fit the {height}x{width} (height x width) image")
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            encoded = counts.encode("ascii") if isinstance(counts, str) else counts
            rle = {"size": [height, width], "counts": encoded}
    with warnings.catch_warnings():
        # pycocotools 2.0.11's Cython decode trips numpy 2's __array__(copy=...) DeprecationWarning; harmless
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword",
                                DeprecationWarning)
        return mask_utils.decode(rle).astype(bool)


def paint_semantic_mask(anns: list[dict[str, Any]], height: int, width: int, category_map: dict[int, int],
                        source: str | Path = "") -> np.ndarray:
    """uint8 (H, W): 0 background, 1..80, 255 crowd; painting order as in ``MASK_RULES``."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for ann in (a for a in anns if a.get("iscrowd")):
        mask[annotation_mask(ann, height, width, source)] = IGNORE_INDEX
    instances = [(a, annotation_mask(a, height, width, source)) for a in anns if not a.get("iscrowd")]
    # largest first, smaller on top; equal areas: lower id first, so the higher id ends on top
    instances.sort(key=lambda item: (-float(item[0].get("area", item[1].sum())), item[0]["id"]))
    for ann, region in instances:
        mask[region] = category_map[ann["category_id"]]
    return mask


def load_instances(path: str | Path) -> tuple[dict[str, dict], dict[int, list[dict]], dict[int, int]]:
    """``({file stem: image record}, {image id: annotations}, category map)`` of an instances JSON."""
    with open(path) as f:
        data = json.load(f)
    category_map = coco_category_map(data.get("categories", []), path)
    images = {Path(im["file_name"]).stem: im for im in data["images"]}
    if len(images) != len(data["images"]):
        raise DataFileError(f"{path}: several images share a file name stem")
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in data["annotations"]:
        if ann["category_id"] not in category_map:
            raise DataFileError(f"{path}: annotation {ann['id']} has unknown category_id "
                                f"{ann['category_id']}")
        by_image[ann["image_id"]].append(ann)
    return images, by_image, category_map


def build_coco_semantic_masks(instances_json: str | Path, out_dir: str | Path,
                              image_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Write ``<out_dir>/<id>.png`` (palette PNG, ``MASK_RULES``) and ``<out_dir>/cls_labels.npz``.

    Every file is written under a temporary name and renamed; existing PNGs are kept, and a folder whose
    ``.complete.json`` says complete is not touched again. ``image_names`` (file stems) limits the masks
    written (labels always cover the whole JSON).

    Returns:
        ``{id: float32 (80,) multi-hot}`` for every image of the JSON.

    Raises:
        FileExistsError: ``out_dir`` was built from another JSON or with other rules.
    """
    instances_json, out_dir = Path(instances_json), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    labels_path, marker = out_dir / "cls_labels.npz", out_dir / MARKER
    source = {"instances_json": instances_json.name, "bytes": instances_json.stat().st_size,
              "rules": MASK_RULES}
    meta = json.loads(marker.read_text()) if marker.is_file() else None
    if meta is not None and meta["source"] != source:
        raise FileExistsError(f"{out_dir} was built from {meta['source']}, not {source}; "
                              "use another cache_dir")
    if meta is not None and meta["complete"] and labels_path.is_file():
        return load_cls_labels(labels_path, len(COCO_CLASSES))
    write_bytes_atomic(marker, json.dumps({"source": source, "complete": False}).encode())
    images, by_image, category_map = load_instances(instances_json)
    labels = {}
    for name, image in images.items():
        labels[name] = np.zeros(len(COCO_CLASSES), dtype=np.float32)
        for ann in by_image[image["id"]]:
            if not ann.get("iscrowd"):
                labels[name][category_map[ann["category_id"]] - 1] = 1.0
    tmp = out_dir / f".cls_labels.{os.getpid()}.tmp.npz"
    save_cls_labels_npz(labels, tmp)
    os.replace(tmp, labels_path)
    unknown = sorted(set(image_names or ()) - images.keys())
    if unknown:
        raise UnlabelledIdsError(f"{len(unknown)} image names are not in {instances_json}, e.g. "
                                 f"{unknown[:5]}")
    names = image_names if image_names is not None else list(images)
    todo = [n for n in names if not (out_dir / f"{n}.png").is_file()]
    for name in tqdm(todo, desc=f"COCO masks {instances_json.name}", disable=len(todo) < 500):
        image = images[name]
        anns = by_image[image["id"]]
        mask = paint_semantic_mask(anns, image["height"], image["width"], category_map, instances_json)
        write_bytes_atomic(out_dir / f"{name}.png", palette_png_bytes(mask))
    if image_names is None:
        write_bytes_atomic(marker, json.dumps({"source": source, "complete": True}).encode())
    return labels


class COCODataModule(WSSSDataModule):
    """MS COCO 2014 (or any split in the official layout), masks and labels derived from instances JSON.

    Args:
        root: COCO root holding ``<split>/`` image folders and ``annotations/instances_<split>.json``
            (read only). ``../shared/data/coco-mini`` works with both splits set to ``val2017``.
        cache_dir: where ``prepare_data`` writes masks and labels (default ``<root>/lit_wsss_cache``).
        train_split: classifier training images (SIPE: ``train2014``).
        val_split: split scored during training and by ``validate``. SIPE reports CAM mIoU on ``train2014``.
        predict_split: split exported by ``lit-wsss predict``; defaults to ``val_split`` (and ``val_list``).
        train_list, val_list, predict_list: optional list files (SIPE's ``train_coco.txt`` style, one name per
            line) resolved like VOC lists. Without one, every image with at least one non-crowd annotation is
            used; SIPE's 82081 / 40137 lists presumably follow the same rule (protocol.md §1.4).
        **kwargs: the loader and augmentation arguments of :class:`~lit_wsss.datamodules.base.WSSSDataModule`.
    """

    def __init__(
        self,
        root: str,
        cache_dir: str | None = None,
        train_split: str = "train2014",
        val_split: str = "train2014",
        predict_split: str | None = None,
        train_list: str | None = None,
        val_list: str | None = None,
        predict_list: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.root = Path(root)
        self.cache_dir = Path(cache_dir) if cache_dir else self.root / "lit_wsss_cache"
        self.train_split, self.val_split = train_split, val_split
        self.train_list, self.val_list = train_list, val_list
        self.predict_split = predict_split or val_split
        self.predict_list = predict_list if predict_split else predict_list or val_list
        self.class_names = COCO_CLASSES
        self.num_classes = len(COCO_CLASSES)

    def instances_json(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    def derived_dir(self, split: str) -> Path:
        """Masks and labels derived from ``instances_json(split)``."""
        return self.cache_dir / self.instances_json(split).stem

    def prepare_data(self) -> None:
        for split in dict.fromkeys((self.train_split, self.val_split, self.predict_split)):
            if not self.instances_json(split).is_file():
                raise MissingDataError(f"COCO instances JSON not found: {self.instances_json(split)}")
            build_coco_semantic_masks(self.instances_json(split), self.derived_dir(split))

    def _dataset(self, split: str, list_name: str | None, with_masks: bool,
                 train: bool) -> SegmentationFolderDataset:
        folder = self.derived_dir(split)
        meta = json.loads((folder / MARKER).read_text()) if (folder / MARKER).is_file() else {}
        if not meta.get("complete"):
            raise MissingDataError(f"no complete masks/labels in {folder}: run prepare_data() first")
        labels = load_cls_labels(folder / "cls_labels.npz", self.num_classes)
        if list_name:
            ids_source: Any = resolve_list(self.root, list_name)
            ids = read_id_list(ids_source)
        else:
            ids_source = f"split {split}"
            ids = sorted(i for i, vector in labels.items() if vector.any())
        masks = [folder / f"{i}.png" for i in ids] if with_masks else None
        return self.folder_dataset(
            ids, [self.root / split / f"{i}.jpg" for i in ids], labels, train=train, mask_paths=masks,
            ids_source=ids_source, labels_source=self.instances_json(split),
        )

    def setup(self, stage: str) -> None:
        if not self.root.is_dir():
            raise MissingDataError(f"COCO root not found: {self.root} (data.root)")
        if stage == "fit":
            self.train_dataset = self._dataset(self.train_split, self.train_list, False, train=True)
        if stage in ("fit", "validate"):
            self.val_dataset = self._dataset(self.val_split, self.val_list, True, train=False)
        if stage == "test":
            raise ValueError("COCO test2014 has no public annotations; use `validate` with data.val_split")
        if stage == "predict":
            self.predict_dataset = self._dataset(self.predict_split, self.predict_list, False, train=False)

    def protocol(self) -> dict[str, Any]:
        record = super().protocol()
        record.update(
            root=str(self.root),
            train_split=self.train_split,
            val_split=self.val_split,
            predict_split=self.predict_split,
            train_list=self.train_list,
            val_list=self.val_list,
            predict_list=self.predict_list,
            ground_truth="masks derived from instances JSON",
            mask_rules=dict(MASK_RULES),
        )
        return record
