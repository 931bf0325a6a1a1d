"""The official algorithms as their own processes, for ``benchmarks/speed_vs_official.py``.

Written from ../shared/methods/protocol.md (the official code is not available here), structured as the official
scripts are: one image at a time, in one process, reading the official per-image ``.npy`` CAM dicts.

* ``eval``: IRN ``step/eval_cam.py`` (§5) once per threshold, as a sweep with the official script means: for
  every threshold, every CAM file and mask is read again, the background plane is padded in front of
  ``high_res``, argmax, mapped through ``(0, keys + 1)``, one confusion over all pixels (255 ignored); the
  per-class IoU nan-mean. Prints one JSON line ``{"miou": [...]}``.
* ``ir``: IRN ``step/cam_to_ir_label.py`` (§6.1) on one process: fg/bg planes 0.30 / 0.05, IRN's dense CRF on
  each, combined into ``<id>.png`` (0..C, 255).

Only numpy, PIL and pydensecrf are imported: these are not lit_wsss, they are what lit_wsss is measured against.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def read_official_cam(path: Path) -> dict:
    # The official format is a pickled dict; these files are written by the benchmark itself.
    return np.load(path, allow_pickle=True).item()


def eval_cam(cams: Path, masks: Path, ids: list[str], thresholds: list[float], num_classes: int) -> list[float]:
    n = num_classes + 1
    mious = []
    for threshold in thresholds:
        confusion = np.zeros((n, n), np.int64)
        for image_id in ids:
            record = read_official_cam(cams / f"{image_id}.npy")
            planes = np.pad(record["high_res"], ((1, 0), (0, 0), (0, 0)), mode="constant",
                            constant_values=threshold)
            keys = np.pad(record["keys"] + 1, (1, 0), mode="constant")
            prediction = keys[np.argmax(planes, axis=0)]
            gt = np.array(Image.open(masks / f"{image_id}.png")).astype(np.int64)
            valid = gt != 255
            confusion += np.bincount(n * gt[valid] + prediction[valid], minlength=n * n).reshape(n, n)
        diagonal = np.diag(confusion).astype(np.float64)
        union = confusion.sum(0) + confusion.sum(1) - diagonal
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = diagonal / union
        mious.append(float(np.nanmean(iou)))
    return mious


def crf_inference_label(image: np.ndarray, labels: np.ndarray, n_labels: int) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    height, width = image.shape[:2]
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    crf.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=False))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image), compat=10)
    q = crf.inference(10)
    return np.argmax(np.array(q).reshape((n_labels, height, width)), axis=0)


def ir_labels(cams: Path, images: Path, ids: list[str], out: Path, fg: float = 0.30, bg: float = 0.05) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for image_id in ids:
        image = np.array(Image.open(images / f"{image_id}.jpg").convert("RGB"))
        record = read_official_cam(cams / f"{image_id}.npy")
        keys = np.pad(record["keys"] + 1, (1, 0), mode="constant")
        fg_conf = keys[crf_inference_label(image, np.argmax(np.pad(record["high_res"], ((1, 0), (0, 0), (0, 0)),
                                                                   mode="constant", constant_values=fg), 0),
                                           keys.shape[0])]
        bg_conf = keys[crf_inference_label(image, np.argmax(np.pad(record["high_res"], ((1, 0), (0, 0), (0, 0)),
                                                                   mode="constant", constant_values=bg), 0),
                                           keys.shape[0])]
        label = fg_conf.copy()
        label[fg_conf == 0] = 255
        label[bg_conf + fg_conf == 0] = 0
        Image.fromarray(label.astype(np.uint8)).save(out / f"{image_id}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=("eval", "ir"))
    parser.add_argument("--cams", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True, help="VOC layout: JPEGImages/, SegmentationClass/")
    parser.add_argument("--ids", type=Path, required=True, help="one id per line")
    parser.add_argument("--thresholds", default="", help="eval: comma list")
    parser.add_argument("--num-classes", type=int, default=20)
    parser.add_argument("--out", type=Path, help="ir: output folder")
    args = parser.parse_args(argv)
    ids = args.ids.read_text().split()
    if args.stage == "eval":
        thresholds = [float(t) for t in args.thresholds.split(",")]
        print(json.dumps({"miou": eval_cam(args.cams, args.root / "SegmentationClass", ids, thresholds,
                                           args.num_classes)}))
    else:
        ir_labels(args.cams, args.root / "JPEGImages", ids, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
