"""Speed of the one-pass CAM threshold sweep (``lit_wsss.evaluation``) against a per-threshold loop.

Writes random smooth CAM files (one channel per labelled class, at mask size, deterministic seed) for the
600 images of ``voc12-bench`` into a temporary folder, then times

(a) ``evaluate_cam_folder`` at the 21 thresholds 0.0:0.6:0.03 (one pass over the files);
(b) the straightforward protocol: for each threshold, one pass over the files (``cams_to_mask`` + confusion);
(c) the same per-threshold decoding with each file read once (isolates decoding from file reading);
(d) as (c) with a numpy argmax: a fairer per-threshold baseline (torch's CPU argmax over dim 0 is slow);

checks that all three give identical confusion matrices and prints a markdown table.

    .venv/bin/python benchmarks/eval_cam_speed.py [VOC12_BENCH_ROOT] [--limit N] [--seed S] [--threads T]

Not a test: it takes tens of seconds on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lit_wsss.cams import NORM_EPS, cams_to_mask
from lit_wsss.datamodules.files import read_id_list, read_mask
from lit_wsss.datamodules.labels import load_cls_labels
from lit_wsss.evaluation import evaluate_cam_folder, parse_thresholds
from lit_wsss.io import IGNORE_INDEX, save_npz_atomic
from lit_wsss.metrics import miou_from_confusion

REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 20


def smooth_cams(
    rng: np.random.Generator, num_keys: int, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random smooth maps: coarse uniform noise upsampled bilinearly, squared, max-normalised like IRN."""
    coarse_size = (math.ceil(height / 32) + 1, math.ceil(width / 32) + 1)
    coarse = torch.from_numpy(rng.random((1, num_keys, *coarse_size)))
    coarse = coarse.float() ** 2
    high_res = F.interpolate(coarse, (height, width), mode="bilinear", align_corners=False)[0]
    strided = F.interpolate(coarse, (math.ceil(height / 4), math.ceil(width / 4)), mode="bilinear",
                            align_corners=False)[0]
    high_res /= high_res.flatten(1).amax(1).view(-1, 1, 1) + NORM_EPS
    strided /= strided.flatten(1).amax(1).view(-1, 1, 1) + NORM_EPS
    return high_res.numpy(), strided.numpy()


def write_cams(root: Path, ids: list[str], labels: dict[str, np.ndarray], out: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for image_id in ids:
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as png:
            width, height = png.size
        keys = np.flatnonzero(labels[image_id]).astype(np.int64)
        high_res, strided = smooth_cams(rng, len(keys), height, width)
        save_npz_atomic(out / f"{image_id}.npz", keys=keys, high_res=high_res, cam=strided)


def confusion(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    n = NUM_CLASSES + 1
    valid = gt != IGNORE_INDEX
    return np.bincount(gt[valid].astype(np.int64) * n + pred[valid], minlength=n * n).reshape(n, n)


def load(cams: Path, root: Path, image_id: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    with np.load(cams / f"{image_id}.npz", allow_pickle=False) as data:
        keys, high_res = torch.from_numpy(data["keys"]), torch.from_numpy(data["high_res"])
    gt = read_mask(root / "SegmentationClass" / f"{image_id}.png", tuple(high_res.shape[1:]), NUM_CLASSES)
    return keys, high_res, gt


def per_threshold_passes(cams: Path, root: Path, ids: list[str], thresholds: list[float]) -> np.ndarray:
    """(b) one pass over the files per threshold."""
    total = np.zeros((len(thresholds), NUM_CLASSES + 1, NUM_CLASSES + 1), np.int64)
    for index, tau in enumerate(thresholds):
        for image_id in ids:
            keys, high_res, gt = load(cams, root, image_id)
            total[index] += confusion(gt, cams_to_mask(high_res, keys, tau).numpy())
    return total


def per_threshold_decoding(cams: Path, root: Path, ids: list[str], thresholds: list[float]) -> np.ndarray:
    """(c) each file read once, decoded once per threshold."""
    total = np.zeros((len(thresholds), NUM_CLASSES + 1, NUM_CLASSES + 1), np.int64)
    for image_id in ids:
        keys, high_res, gt = load(cams, root, image_id)
        for index, tau in enumerate(thresholds):
            total[index] += confusion(gt, cams_to_mask(high_res, keys, tau).numpy())
    return total


def per_threshold_numpy(cams: Path, root: Path, ids: list[str], thresholds: list[float]) -> np.ndarray:
    """(d) like (c), decoding with numpy's argmax (torch's CPU argmax over dim 0 is slow at these sizes)."""
    total = np.zeros((len(thresholds), NUM_CLASSES + 1, NUM_CLASSES + 1), np.int64)
    for image_id in ids:
        keys, high_res, gt = load(cams, root, image_id)
        cams_np, lookup = high_res.numpy(), np.concatenate([[0], keys.numpy() + 1])
        for index, tau in enumerate(thresholds):
            plane = np.full((1, *cams_np.shape[1:]), tau, dtype=cams_np.dtype)
            total[index] += confusion(gt, lookup[np.concatenate([plane, cams_np]).argmax(0)])
    return total


def timed(function, *args):
    start = time.perf_counter()
    value = function(*args)
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=str(REPO_ROOT.parent / "shared" / "data" / "voc12-bench"),
                        help="voc12-bench root (default ../shared/data/voc12-bench beside the repo)")
    parser.add_argument("--thresholds", default="0.0:0.6:0.03")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    root = Path(args.root)
    ids = read_id_list(root / "ImageSets" / "Segmentation" / "train.txt")[: args.limit]
    labels = load_cls_labels(root / "cls_labels.npy", NUM_CLASSES)
    thresholds = parse_thresholds(args.thresholds)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="eval_cam_speed_") as folder:
        cams = Path(folder)
        _, write_seconds = timed(write_cams, root, ids, labels, cams, args.seed)
        size = sum(p.stat().st_size for p in cams.glob("*.npz"))
        result, one_pass = timed(lambda: evaluate_cam_folder(cams, root, ids, thresholds, progress=False))
        loop, loop_seconds = timed(per_threshold_passes, cams, root, ids, thresholds)
        decoded, decode_seconds = timed(per_threshold_decoding, cams, root, ids, thresholds)
        numpy_decoded, numpy_seconds = timed(per_threshold_numpy, cams, root, ids, thresholds)
    swept = np.array(result["confusion"], dtype=np.int64)
    identical = all(np.array_equal(swept, other) for other in (loop, decoded, numpy_decoded))

    count = len(ids)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, Python "
          f"{platform.python_version()}")
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"data: {root} ({count} images), {len(thresholds)} thresholds "
          f"{thresholds[0]:g}..{thresholds[-1]:g}, "
          f"CAM files {size / 2**20:.1f} MiB written in {write_seconds:.1f} s (seed {args.seed})")
    print()
    print("| method | images | thresholds | seconds | speed-up vs (b) | ms / image |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = [
        ("(a) one-pass sweep, `evaluate_cam_folder`", one_pass),
        ("(b) per threshold: one pass over the files each (`cams_to_mask` + confusion)", loop_seconds),
        ("(c) per threshold, files read once (decoding cost only)", decode_seconds),
        ("(d) as (c), numpy argmax instead of `cams_to_mask`", numpy_seconds),
    ]
    for name, seconds in rows:
        print(f"| {name} | {count} | {len(thresholds)} | {seconds:.2f} | {loop_seconds / seconds:.1f}x | "
              f"{1000 * seconds / count:.1f} |")
    print()
    fixed, best = result["fixed"], result["best"]
    check = miou_from_confusion(torch.from_numpy(loop[thresholds.index(best["threshold"])]))
    print(f"confusions identical (a) == (b) == (c) == (d): {identical}; "
          f"random-CAM mIoU at {fixed['threshold']:g}: "
          f"{100 * fixed['miou']:.2f} %, oracle {best['threshold']:g}: {100 * best['miou']:.2f} % "
          f"(check from (b): {100 * check:.2f} %)")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
