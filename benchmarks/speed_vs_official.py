"""Each tool as the user runs it, a whole process timed from start to exit, against the official algorithm run
the official way (``benchmarks/official_loops.py``, one process each), on the same inputs; prints the ratios.

* eval: ``lit-wsss eval-cam`` (one pass over the files for the whole sweep) vs IRN's ``eval_cam`` once per
  threshold, on random smooth CAMs of the 600 ``voc12-bench`` images (320 px), 21 thresholds 0.0:0.6:0.03. The
  mIoU at every threshold must be identical.
* IR labels: ``lit-wsss ir-labels --workers N`` vs IRN's ``cam_to_ir_label`` in one process, on CAMs made from
  the ground-truth masks (blurred one-hot, sigma 8 px) of the first ``--ir-images`` ``voc12-mini`` images at
  their original size. Every label map must be identical.

Both sides read CAMs in their own format: ours ``<id>.npz`` (lit_wsss.cam_files), the official ``<id>.npy``
pickled dicts (written here from the same arrays; only the official side reads them).

    .venv/bin/python benchmarks/speed_vs_official.py [--shared-data ../shared/data] [--workers 2]
        [--ir-images 40] [--repeat 1]

Not a test: about two minutes on a 2-core CPU; run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from eval_cam_speed import write_cams  # noqa: E402
from ir_labels_speed import write_cams_from_masks  # noqa: E402

from lit_wsss.datamodules.files import read_id_list  # noqa: E402
from lit_wsss.datamodules.labels import load_cls_labels  # noqa: E402
from lit_wsss.evaluation import parse_thresholds  # noqa: E402

OFFICIAL = [sys.executable, str(REPO / "benchmarks" / "official_loops.py")]
OURS = [sys.executable, "-m", "lit_wsss"]


def write_official_copies(folder: Path, out: Path) -> None:
    """The official per-image dict files (``keys``, ``cam``, ``high_res``) of every ``.npz`` in ``folder``."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.glob("*.npz")):
        with np.load(path, allow_pickle=False) as cams:
            record = {"keys": cams["keys"], "cam": cams["cam"], "high_res": cams["high_res"]}
        np.save(out / f"{path.stem}.npy", record, allow_pickle=True)


def timed_process(command: list[str], repeat: int) -> tuple[float, subprocess.CompletedProcess]:
    """Best wall time of ``repeat`` runs of ``command`` (start-up and exit included), and the last result."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
        best = min(best, time.perf_counter() - start)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return best, result


def bench_eval(bench: Path, work: Path, images: int | None, repeat: int) -> dict:
    ids = read_id_list(bench / "ImageSets" / "Segmentation" / "train.txt")[:images]
    labels = load_cls_labels(bench / "cls_labels.npy", 20)
    ours_dir, official_dir = work / "eval_npz", work / "eval_npy"
    ours_dir.mkdir()
    write_cams(bench, ids, labels, ours_dir, seed=0)
    write_official_copies(ours_dir, official_dir)
    thresholds = ",".join(repr(t) for t in parse_thresholds("0.0:0.6:0.03"))
    id_file = work / "eval_ids.txt"
    id_file.write_text("\n".join(ids) + "\n")
    out = work / "eval_ours" / "result.json"
    ours_s, _ = timed_process([*OURS, "eval-cam", "--cams", str(ours_dir), "--root", str(bench), "--list",
                               str(id_file), "--thresholds", thresholds, "--num-classes", "20", "--out", str(out),
                               "--no-progress"], repeat)
    official_s, official = timed_process([*OFFICIAL, "eval", "--cams", str(official_dir), "--root", str(bench),
                                          "--ids", str(id_file), "--thresholds", thresholds], repeat)
    ours_miou = json.loads(out.read_text())["miou"]
    official_miou = json.loads(official.stdout.strip().splitlines()[-1])["miou"]
    identical = len(ours_miou) == len(official_miou) and all(
        abs(a - b) < 1e-12 for a, b in zip(ours_miou, official_miou))
    return {"stage": "eval-cam (21 thresholds)", "images": len(ids), "ours": ours_s, "official": official_s,
            "goal": 10.0, "identical": identical, "detail": f"best mIoU {max(ours_miou):.4f}"}


def bench_ir(mini: Path, work: Path, images: int, workers: int, repeat: int) -> dict:
    ids = sorted(read_id_list(mini / "train.txt") + read_id_list(mini / "val.txt"))[:images]
    ours_dir, official_dir = work / "ir_npz", work / "ir_npy"
    ours_dir.mkdir()
    write_cams_from_masks(mini, ids, ours_dir, sigma=8.0)
    write_official_copies(ours_dir, official_dir)
    id_file = work / "ir_ids.txt"
    id_file.write_text("\n".join(ids) + "\n")
    ours_out, official_out = work / "ir_ours", work / "ir_official"
    ours_s = float("inf")
    for attempt in range(repeat):  # a rerun would skip the finished ids: a new folder each time
        folder = ours_out.with_name(f"{ours_out.name}_{attempt}")
        seconds, _ = timed_process([*OURS, "ir-labels", "--cams", str(ours_dir), "--root", str(mini),
                                          "--list", str(id_file), "--out", str(folder), "--workers", str(workers),
                                          "--no-progress"], 1)
        ours_s, ours_out_used = min(ours_s, seconds), folder
    official_s, _ = timed_process([*OFFICIAL, "ir", "--cams", str(official_dir), "--root", str(mini), "--ids",
                                   str(id_file), "--out", str(official_out)], repeat)
    identical = all(np.array_equal(np.array(Image.open(ours_out_used / f"{i}.png")),
                                   np.array(Image.open(official_out / f"{i}.png"))) for i in ids)
    return {"stage": f"ir-labels (--workers {workers} vs 1 process)", "images": len(ids), "ours": ours_s,
            "official": official_s, "goal": 1.8, "identical": identical, "detail": "labels compared pixel by pixel"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=None, help="first N voc12-bench images (default all)")
    parser.add_argument("--ir-images", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=1, help="runs per process; the best wall time counts")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="speed_vs_official_") as folder:
        work = Path(folder)
        rows = [bench_eval(args.shared_data / "voc12-bench", work, args.eval_images, args.repeat),
                bench_ir(args.shared_data / "voc12-mini", work, args.ir_images, args.workers, args.repeat)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; load average before {load_before:.2f}, "
          f"after {os.getloadavg()[0]:.2f}\n")
    print("| stage | images | lit_wsss s (whole process) | official s (whole process) | ratio | goal | "
          "identical output |")
    print("|---|---:|---:|---:|---:|---:|---|")
    ok = True
    for row in rows:
        ratio = row["official"] / row["ours"]
        ok &= row["identical"] and ratio >= row["goal"]
        print(f"| {row['stage']} | {row['images']} | {row['ours']:.2f} | {row['official']:.2f} | {ratio:.2f}x | "
              f">= {row['goal']:g}x | {'yes' if row['identical'] else 'NO'} ({row['detail']}) |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
