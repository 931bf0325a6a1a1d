"""Make a folder data set (lit_wsss/datamodules/folder.py) out of a VOC-layout root, to try ``DATA=folder``.

    python examples/folder_from_voc.py --voc ../shared/data/voc12-mini --cls-labels ../shared/data/voc12/cls_labels.npy \
        --out outputs/folder-mini

Writes ``images/`` (file names ``photo-<id>``, every other one re-encoded as PNG, so that names and suffixes are
not VOC's), ``masks/``, ``classes.txt``, ``labels.csv`` (class names), ``train.txt`` (the first
``--train-fraction`` of the ids, sorted) and ``val.txt`` (the rest: the held-out split).
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
from pathlib import Path

from PIL import Image

from lit_wsss.datamodules.files import find_mask_folder
from lit_wsss.datamodules.labels import VOC_CLASSES, load_cls_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc", required=True, help="VOC-layout root with JPEGImages/ and SegmentationClass/")
    parser.add_argument("--cls-labels", required=True, help="its image-level labels (cls_labels.npy or JSON)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-fraction", type=float, default=0.7)
    args = parser.parse_args()
    voc, out = Path(args.voc), Path(args.out)
    masks = find_mask_folder(voc)
    labels = load_cls_labels(args.cls_labels, class_names=VOC_CLASSES)
    ids = sorted(p.stem for p in masks.glob("*.png") if p.stem in labels and (voc / "JPEGImages" / f"{p.stem}.jpg").is_file())
    for folder in ("images", "masks"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = []
    for index, image_id in enumerate(ids):
        name = f"photo-{image_id}"
        source = voc / "JPEGImages" / f"{image_id}.jpg"
        if index % 2:
            buffer = io.BytesIO()
            Image.open(source).convert("RGB").save(buffer, format="PNG")
            (out / "images" / f"{name}.png").write_bytes(buffer.getvalue())
        else:
            shutil.copyfile(source, out / "images" / f"{name}.jpg")
        shutil.copyfile(masks / f"{image_id}.png", out / "masks" / f"{name}.png")
        rows.append((f"{name}{'.png' if index % 2 else '.jpg'}",
                     ";".join(VOC_CLASSES[i] for i in labels[image_id].nonzero()[0])))
    (out / "classes.txt").write_text("\n".join(VOC_CLASSES) + "\n")
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "labels"])
        writer.writerows(rows)
    cut = int(round(args.train_fraction * len(rows)))
    (out / "train.txt").write_text("".join(f"{name}\n" for name, _ in rows[:cut]))
    (out / "val.txt").write_text("".join(f"{name}\n" for name, _ in rows[cut:]))
    print(f"{len(rows)} images -> {out} (train {cut}, val {len(rows) - cut})")


if __name__ == "__main__":
    main()
