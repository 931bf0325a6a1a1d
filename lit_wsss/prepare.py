"""``lit-wsss prepare``: turn the files a user downloads into the folders lit_wsss reads.

``lit-wsss prepare labels --from cls_labels.npy --out cls_labels.json [--classes classes.txt]``
    converts image-level labels to lit_wsss's JSON (``lit_wsss.datamodules.labels``): the official pickled
    ``cls_labels.npy`` of IRN / SIPE / CPN (int or str keys), a CSV, our ``.npz``. This is the one conversion
    that reads the pickle; afterwards every config can point ``cls_labels`` at the JSON.
``lit-wsss prepare coco --root COCO --split train2014 [--cache-dir ...]``
    writes the semantic masks and labels of a COCO split (``lit_wsss.datamodules.coco``, its ``MASK_RULES``)
    into ``<cache-dir>/instances_<split>/``, what ``COCODataModule.prepare_data`` does on first use.

``lit-wsss prepare voc --devkit VOCdevkit/VOC2012 --sbd benchmark_RELEASE [--out DIR] [--no-count-check]``
    builds VOC's augmented set from the devkit and SBD: ``SegmentationClassAug/<id>.png`` (VOC's own mask
    where it has one, else SBD's), ``ImageSets/Segmentation/train_aug.txt`` (10582 ids), ``cls_labels.json``
    (every ``<name>`` of the XML, IRN's convention) and a ``prepare_voc.json`` manifest; default out is the
    devkit folder. A rerun skips the masks that exist.

``prepare labels`` imports neither torch nor Lightning; ``prepare coco`` still imports the COCO DataModule's
module (its mask code lives there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def prepare_labels(source: str | Path, out: str | Path, classes: str | Path | None = None) -> int:
    """Convert a label file to our JSON (names when a class list is given, VOC's names for 20-class
    vectors, else indices). Returns the number of images."""
    from lit_wsss.datamodules.labels import VOC_CLASSES, load_cls_labels, read_class_list, save_labels_json

    names = read_class_list(classes) if classes else None
    labels = load_cls_labels(source, class_names=names)
    sizes = {vector.shape[0] for vector in labels.values()}
    if names is None and sizes == {len(VOC_CLASSES)}:
        names = VOC_CLASSES
    save_labels_json(labels, out, names)
    return len(labels)


VOC_EXPECTED_COUNTS = {"train_aug": 10582, "VOC train": 1464, "VOC val": 1449}


def _read_ids(path: Path, what: str) -> list[str]:
    from lit_wsss.datamodules.files import read_id_list

    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return read_id_list(path)


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file alone (a rerun changes nothing)."""
    from lit_wsss.io import write_bytes_atomic

    if path.is_file() and path.read_bytes() == data:
        return
    write_bytes_atomic(path, data)


def _read_json(path: Path):
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _xml_classes(path: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"unreadable annotation XML {path}: {error}") from error
    return [(obj.findtext("name") or "").strip() for obj in root.iter("object")]


def _sbd_mask(path: Path) -> np.ndarray:
    import scipy.io

    try:
        mask = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except (KeyError, AttributeError) as error:
        raise ValueError(f"{path}: no GTcls.Segmentation (expected an SBD dataset/cls/*.mat)") from error
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{path}: GTcls.Segmentation has shape {mask.shape}, expected HxW")
    return mask.astype(np.uint8)


def prepare_voc(devkit: str | Path, sbd: str | Path, out: str | Path | None = None,
                check_counts: bool = True) -> dict:
    """Build SegmentationClassAug, train_aug.txt, cls_labels.json and prepare_voc.json; returns the manifest."""
    from PIL import Image
    from tqdm import tqdm

    from lit_wsss.datamodules.labels import VOC_CLASSES, save_labels_json
    from lit_wsss.io import palette_png_bytes, write_bytes_atomic, write_json_atomic

    devkit, sbd = Path(devkit), Path(sbd)
    out = Path(out) if out is not None else devkit
    for folder, what in ((devkit / "JPEGImages", "VOCdevkit/VOC2012 with JPEGImages/*.jpg"),
                         (devkit / "SegmentationClass", "VOCdevkit/VOC2012 with SegmentationClass/*.png"),
                         (devkit / "Annotations", "VOCdevkit/VOC2012 with Annotations/*.xml")):
        if not folder.is_dir():
            raise FileNotFoundError(f"VOC folder not found: {folder} (expected {what})")
    sbd_cls = sbd / "dataset" / "cls"
    if not sbd_cls.is_dir():
        raise FileNotFoundError(f"SBD cls folder not found: {sbd_cls} "
                                "(expected benchmark_RELEASE with dataset/cls/*.mat)")
    lists = devkit / "ImageSets" / "Segmentation"
    voc_train = _read_ids(lists / "train.txt", "VOC train list (expected ImageSets/Segmentation/train.txt)")
    voc_val = _read_ids(lists / "val.txt", "VOC val list (expected ImageSets/Segmentation/val.txt)")
    sbd_train = _read_ids(sbd / "dataset" / "train.txt",
                          "SBD train list (expected benchmark_RELEASE/dataset/train.txt)")
    sbd_val = _read_ids(sbd / "dataset" / "val.txt", "SBD val list (expected benchmark_RELEASE/dataset/val.txt)")
    train_aug = sorted((set(sbd_train) | set(sbd_val) | set(voc_train)) - set(voc_val))
    counts = {"train_aug": len(train_aug), "VOC train": len(voc_train), "VOC val": len(voc_val)}
    if check_counts:
        for name, expected in VOC_EXPECTED_COUNTS.items():
            if counts[name] != expected:
                raise ValueError(f"{name} has {counts[name]} ids, expected {expected} for the official "
                                 "VOC2012 + SBD (pass --no-count-check to allow other data)")

    aug_dir = out / "SegmentationClassAug"
    aug_dir.mkdir(parents=True, exist_ok=True)
    all_ids = sorted(set(sbd_train) | set(sbd_val) | set(voc_train) | set(voc_val))
    from_voc = from_sbd = skipped = 0
    for image_id in tqdm(all_ids, desc="prepare voc: masks", unit="mask"):
        target = aug_dir / f"{image_id}.png"
        voc_mask = devkit / "SegmentationClass" / f"{image_id}.png"
        if voc_mask.is_file():
            from_voc += 1
        else:
            from_sbd += 1
        if target.is_file():
            skipped += 1
            continue
        if voc_mask.is_file():
            with Image.open(voc_mask) as image:
                if image.mode not in ("P", "L"):
                    raise ValueError(f"{voc_mask}: mode {image.mode}, expected VOC's palette (P) label PNG")
                mask = np.asarray(image)
        else:
            mat = sbd_cls / f"{image_id}.mat"
            if not mat.is_file():
                raise FileNotFoundError(f"no mask for {image_id}: neither {voc_mask} nor {mat} exists")
            mask = _sbd_mask(mat)
            jpeg = devkit / "JPEGImages" / f"{image_id}.jpg"
            if not jpeg.is_file():
                raise FileNotFoundError(f"image not found: {jpeg} (expected JPEGImages/<id>.jpg for {mat})")
            with Image.open(jpeg) as image:
                width, height = image.size
            if mask.shape != (height, width):
                raise ValueError(f"SBD mask {mat} is {mask.shape[1]}x{mask.shape[0]} but image {jpeg} is "
                                 f"{width}x{height}")
        write_bytes_atomic(target, palette_png_bytes(mask))

    labels, from_xml, from_mask = {}, 0, 0
    index = {name: i for i, name in enumerate(VOC_CLASSES)}
    for image_id in sorted(set(train_aug) | set(voc_val)):
        vector = np.zeros(len(VOC_CLASSES), dtype=np.float32)
        xml = devkit / "Annotations" / f"{image_id}.xml"
        if xml.is_file():
            for name in _xml_classes(xml):
                if name not in index:
                    raise ValueError(f"{xml}: unknown class {name!r} (expected one of VOC's 20 classes)")
                vector[index[name]] = 1.0
            from_xml += 1
        else:
            with Image.open(aug_dir / f"{image_id}.png") as image:
                present = np.unique(np.asarray(image))
            for value in present:
                if 1 <= value <= len(VOC_CLASSES):
                    vector[value - 1] = 1.0
            from_mask += 1
        labels[image_id] = vector

    set_dir = out / "ImageSets" / "Segmentation"
    set_dir.mkdir(parents=True, exist_ok=True)
    _write_if_changed(set_dir / "train_aug.txt", "".join(f"{i}\n" for i in train_aug).encode())
    labels_path = out / "cls_labels.json"
    expected = {i: [VOC_CLASSES[k] for k in np.flatnonzero(v)] for i, v in labels.items()}
    if _read_json(labels_path) != expected:
        save_labels_json(labels, labels_path, VOC_CLASSES)
    manifest = {
        "counts": {"train_aug": len(train_aug), "voc_train": len(voc_train), "voc_val": len(voc_val),
                   "sbd_train": len(sbd_train), "sbd_val": len(sbd_val), "masks": len(all_ids),
                   "labels": len(labels)},
        "sources": {"devkit": str(devkit), "sbd": str(sbd)},
        "masks": {"from_voc": from_voc, "from_sbd": from_sbd},
        "labels": {"from_xml": from_xml, "from_mask": from_mask},
        "count_check": check_counts,
    }
    if _read_json(out / "prepare_voc.json") != manifest:
        write_json_atomic(out / "prepare_voc.json", manifest)
    return dict(manifest, skipped_existing=skipped)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lit-wsss prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    labels = commands.add_parser("labels", help="convert image-level labels (cls_labels.npy, CSV, npz) to JSON")
    labels.add_argument("--from", dest="source", required=True, help="cls_labels.npy, labels.csv or .npz")
    labels.add_argument("--out", required=True, help="the JSON to write")
    labels.add_argument("--classes", help="class list (one name per line), to write and read class names")
    coco = commands.add_parser("coco", help="semantic masks and labels of a COCO split from its instances JSON")
    coco.add_argument("--root", required=True, help="COCO root with <split>/ and annotations/instances_<split>.json")
    coco.add_argument("--split", action="append", required=True, help="e.g. train2014 (repeat for several)")
    coco.add_argument("--cache-dir", help="where the masks go (default <root>/lit_wsss_cache)")
    voc = commands.add_parser("voc", help="SegmentationClassAug, train_aug.txt and cls_labels.json from VOC2012 + SBD")
    voc.add_argument("--devkit", required=True, help="VOCdevkit/VOC2012")
    voc.add_argument("--sbd", required=True, help="SBD's benchmark_RELEASE (dataset/cls/*.mat)")
    voc.add_argument("--out", help="where the outputs go (default the devkit folder)")
    voc.add_argument("--no-count-check", dest="check_counts", action="store_false",
                     help="allow lists whose sizes differ from the official 10582 / 1464 / 1449")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Returns 0 on success, 1 when an input is missing or malformed (the message names it)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "labels":
            count = prepare_labels(args.source, args.out, args.classes)
            print(f"prepare labels: {count} images -> {args.out}")
        elif args.command == "voc":
            manifest = prepare_voc(args.devkit, args.sbd, args.out, args.check_counts)
            print(f"prepare voc: {manifest['counts']['masks']} masks, train_aug {manifest['counts']['train_aug']}, "
                  f"{manifest['counts']['labels']} labels -> {args.out or args.devkit}")
        else:
            from lit_wsss.datamodules.coco import build_coco_semantic_masks

            root = Path(args.root)
            cache = Path(args.cache_dir) if args.cache_dir else root / "lit_wsss_cache"
            for split in args.split:
                source = root / "annotations" / f"instances_{split}.json"
                if not source.is_file():
                    raise FileNotFoundError(f"instances JSON not found: {source} (expected the official "
                                            "annotations/instances_<split>.json layout)")
                labels = build_coco_semantic_masks(source, cache / source.stem)
                print(f"prepare coco: {split}: {len(labels)} images -> {cache / source.stem}")
    except (FileNotFoundError, ValueError, KeyError, FileExistsError) as error:
        print(f"prepare: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
