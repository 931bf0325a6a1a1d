"""COCO masks of lit_wsss's version-1 rasteriser (the hand-written polygon fill and RLE decoder, commit c7058bf)
against the pycocotools masks of today, over coco-mini: how many pixels the change moved.

    python benchmarks/coco_mask_change.py [--shared-data ../shared/data]
"""
import argparse
import importlib.util
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from lit_wsss.datamodules import coco as new

OLD_COMMIT = "c7058bf"  # the last commit with MASK_RULES version 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared-data", default="../shared/data")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # pycocotools' numpy-2 copy warning
    source = subprocess.run(["git", "show", f"{OLD_COMMIT}:lit_wsss/datamodules/coco.py"], check=True,
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "coco_v1.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("coco_v1", path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    images, by_image, category_map = new.load_instances(
        Path(args.shared_data) / "coco-mini" / "annotations" / "instances_val2017.json")
    moved = total = images_moved = 0
    instance_pixels, kinds = [], {"polygon": 0, "crowd RLE": 0}
    instances = 0
    for image in images.values():
        h, w, anns = image["height"], image["width"], by_image[image["id"]]
        diff = int((old.paint_semantic_mask(anns, h, w, category_map)
                    != new.paint_semantic_mask(anns, h, w, category_map)).sum())
        moved, total, images_moved = moved + diff, total + h * w, images_moved + (diff > 0)
        for ann in anns:
            instances += 1
            k = int((old.annotation_mask(ann, h, w) != new.annotation_mask(ann, h, w)).sum())
            if k:
                instance_pixels.append(k)
                kinds["crowd RLE" if ann.get("iscrowd") else "polygon"] += 1
    print("| measure | value |\n|---|---|")
    print(f"| images with a changed pixel | {images_moved} of {len(images)} |")
    print(f"| semantic-mask pixels changed | {moved} of {total} ({100 * moved / total:.4f} %) |")
    print(f"| instance masks changed | {len(instance_pixels)} of {instances} (polygon {kinds['polygon']}, "
          f"crowd RLE {kinds['crowd RLE']}) |")
    if instance_pixels:
        print(f"| pixels per changed instance | median {np.median(instance_pixels):.0f}, max {max(instance_pixels)} |")


if __name__ == "__main__":
    sys.exit(main())
