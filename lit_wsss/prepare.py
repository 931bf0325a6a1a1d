"""``lit-wsss prepare``: turn the files a user downloads into the folders lit_wsss reads.

``lit-wsss prepare labels --from cls_labels.npy --out cls_labels.json [--classes classes.txt]``
    converts image-level labels to lit_wsss's JSON (``lit_wsss.datamodules.labels``): the official pickled
    ``cls_labels.npy`` of IRN / SIPE / CPN (int or str keys), a CSV, our ``.npz``. This is the one conversion
    that reads the pickle; afterwards every config can point ``cls_labels`` at the JSON.
``lit-wsss prepare coco --root COCO --split train2014 [--cache-dir ...]``
    writes the semantic masks and labels of a COCO split (``lit_wsss.datamodules.coco``, its ``MASK_RULES``)
    into ``<cache-dir>/instances_<split>/``, what ``COCODataModule.prepare_data`` does on first use.

``prepare labels`` imports neither torch nor Lightning; ``prepare coco`` still imports the COCO DataModule's
module (its mask code lives there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Returns 0 on success, 1 when an input is missing or malformed (the message names it)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "labels":
            count = prepare_labels(args.source, args.out, args.classes)
            print(f"prepare labels: {count} images -> {args.out}")
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
