"""Throughput of the IR-label stage (``lit_wsss.refine.ir_labels``, protocol.md §6.1) with 1 vs N processes.

Real images: ``voc12-mini`` (145 VOC 2012 images at their original size, ``train.txt`` + ``val.txt``). CAMs
are built from the ground-truth masks into a temporary folder: for every class present in the mask, its
one-hot map blurred by a Gaussian (sigma ``--sigma`` px) and max-normalised; ``keys`` = the classes present
(0-based). Each worker count writes its own output folder from scratch; the PNGs must be byte-identical.

    .venv/bin/python benchmarks/ir_labels_speed.py [VOC12_MINI_ROOT] [--workers 1,2] [--limit N]

Not a test: a few minutes on a 2-core CPU. The multi-process figures include starting the pool's workers;
the forkserver they fork from (which imports lit_wsss and torch once per parent process) is started before
timing and reported on its own line, unless ``--cold``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lit_wsss.datamodules.files import read_id_list
from lit_wsss.io import save_npz_atomic, write_json_atomic
from lit_wsss.refine.ir_labels import make_ir_labels, worker_context

REPO_ROOT = Path(__file__).resolve().parents[1]
NORM_EPS = 1e-5


def write_cams_from_masks(root: Path, ids: list[str], out: Path, sigma: float) -> None:
    """One blurred, max-normalised one-hot map per class present in each ground-truth mask."""
    for image_id in ids:
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as png:
            mask = np.array(png)
        classes = [c for c in np.unique(mask).tolist() if c not in (0, 255)]
        maps = []
        for c in classes:
            blurred = cv2.GaussianBlur((mask == c).astype(np.float32), (0, 0), sigma)
            maps.append(blurred / (blurred.max() + NORM_EPS))
        high_res = np.stack(maps) if maps else np.zeros((0, *mask.shape), np.float32)
        strided = np.ascontiguousarray(high_res[:, ::4, ::4])
        save_npz_atomic(out / f"{image_id}.npz", keys=np.array(classes, np.int64) - 1, high_res=high_res,
                        cam=strided)
    write_json_atomic(out / "manifest.json", {"producer": "benchmarks/ir_labels_speed.py (ground-truth CAMs)",
                                              "checkpoint": None, "count": len(ids), "bg_threshold": None})


def agreement(root: Path, out: Path, ids: list[str]) -> tuple[float, float]:
    """Fraction of labelled (gt != 255) pixels that are confident, and the accuracy on those."""
    labelled = confident = correct = 0
    for image_id in ids:
        with Image.open(out / f"{image_id}.png") as png:
            label = np.array(png)
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as png:
            gt = np.array(png)
        valid = gt != 255
        keep = valid & (label != 255)
        labelled += int(valid.sum())
        confident += int(keep.sum())
        correct += int((label[keep] == gt[keep]).sum())
    return confident / labelled, correct / max(confident, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", default=str(REPO_ROOT.parent / "shared" / "data" / "voc12-mini"),
                        help="voc12-mini root (default ../shared/data/voc12-mini beside the repo)")
    parser.add_argument("--workers", default="1,2", help="comma list of process counts (default 1,2)")
    parser.add_argument("--limit", type=int, default=None, help="first N images only")
    parser.add_argument("--cold", action="store_true",
                        help="do not start the forkserver before timing (its start-up then counts)")
    parser.add_argument("--sigma", type=float, default=8.0, help="Gaussian blur of the one-hot maps (px)")
    args = parser.parse_args(argv)

    root = Path(args.root)
    ids = [i for name in ("train.txt", "val.txt") for i in read_id_list(root / name)][: args.limit]
    counts = [int(w) for w in args.workers.split(",")]
    load_before = os.getloadavg()[0]
    context = worker_context()
    start_method = context.get_start_method()
    warm_seconds = None
    if not args.cold and any(w > 1 for w in counts):
        start = time.perf_counter()
        with context.Pool(1) as pool:  # starts the forkserver (paid once per parent process)
            pool.map(abs, [0])
        warm_seconds = time.perf_counter() - start
    rows = []
    with tempfile.TemporaryDirectory(prefix="ir_labels_speed_") as folder:
        cams = Path(folder) / "cams"
        cams.mkdir()
        start = time.perf_counter()
        write_cams_from_masks(root, ids, cams, args.sigma)
        write_seconds = time.perf_counter() - start
        reference = None
        identical = True
        for workers in counts:
            out = Path(folder) / f"out_{workers}"
            cpu = time.process_time()
            result = make_ir_labels(cams, root, ids, out, workers=workers, progress=False)
            cpu = time.process_time() - cpu  # all of the work only when it runs in this process (workers 1)
            assert result["written"] == len(ids)
            rows.append((workers, len(ids), result["seconds"], cpu))
            pngs = {i: (out / f"{i}.png").read_bytes() for i in ids}
            if reference is None:
                reference = pngs
                coverage, accuracy = agreement(root, out, ids)
            else:
                identical &= pngs == reference
    pixels = 0
    for image_id in ids:
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as jpeg:
            pixels += jpeg.size[0] * jpeg.size[1]

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
          f"({len(os.sched_getaffinity(0))} usable), numpy {np.__version__}, OpenCV {cv2.__version__}, "
          f"Python {platform.python_version()}")
    print(f"load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}")
    print(f"data: {root} ({len(ids)} images, {pixels / len(ids) / 1e3:.0f} kpx on average); ground-truth "
          f"CAMs (sigma {args.sigma:g} px) written in {write_seconds:.1f} s; convention constant "
          "0.30 / 0.05, IRN CRF (2 x 10 mean-field iterations per image)")
    if warm_seconds is not None:
        print(f"process start method: {start_method}; forkserver started (lit_wsss + torch imported once) "
              f"before timing: {warm_seconds:.1f} s, not in the table")
    print()
    print("| workers | images | seconds | images/s | speed-up |")
    print("|---:|---:|---:|---:|---:|")
    for workers, count, seconds, _ in rows:
        speed_up = rows[0][2] / seconds
        print(f"| {workers} | {count} | {seconds:.1f} | {count / seconds:.2f} | {speed_up:.2f}x |")
    for workers, count, seconds, cpu in rows:
        if workers == 1:
            print(f"\nworkers 1 ran in this process: CPU {cpu:.1f} s for {seconds:.1f} s wall "
                  f"({1000 * cpu / count:.0f} ms CPU per image; wall > CPU: other jobs shared the cores)")
    print()
    print(f"PNGs identical across worker counts: {identical}; confident pixels {100 * coverage:.1f} % of the "
          f"labelled ones, {100 * accuracy:.2f} % of them equal to the ground truth")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
