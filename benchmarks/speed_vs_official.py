"""Each tool as the user runs it, a whole process timed from start to exit, against the official algorithm run
the official way (``benchmarks/official_loops.py``, one process each), on the same inputs; prints the ratios.

* eval: ``lit-wsss eval-cam`` (one pass over the files for the whole sweep) vs IRN's ``eval_cam`` once per
  threshold, on random smooth CAMs of the 600 ``voc12-bench`` images (320 px), 21 thresholds 0.0:0.6:0.03. The
  mIoU at every threshold must be identical.
* IR labels: ``lit-wsss ir-labels --workers N`` vs IRN's ``cam_to_ir_label`` in one process, on CAMs made from
  the ground-truth masks (blurred one-hot, sigma 8 px) of the first ``--ir-images`` ``voc12-mini`` images at
  their original size. Every label map must be identical.
* CAM export: ``lit-wsss predict`` with ``experiments/stages/predict_cams.yaml`` (as ``make cams`` runs it) vs
  IRN's ``make_cam`` on the CPU, both from one ResNet-50 CAM checkpoint (random init, written here by a one-step
  ``fit``: no ImageNet ResNet weights can be fetched; speed does not depend on the weights), on the first
  ``--cam-images`` ``voc12-bench`` images, 4 scales + flips. Each side runs twice, on ``--cam-few-images`` and
  on ``--cam-images`` images: the goal is on the seconds per image (the slope between the two whole-process
  times, what each image of a 1464- or 10582-image export costs); the whole process and its start-up (the
  intercept: imports, checkpoint, the frozen graph) are printed beside it. The outputs are compared, not required
  identical: lit_wsss rescales the normalised tensor with antialiased bicubic, IRN the uint8 image with PIL
  (protocol.md pitfall P3, documented in lit_wsss.cams.scaled_flip_pairs), and the frozen graph rounds
  differently. Reported: the largest difference of the CAMs and the share of pixels whose mask at 0.15 differs.
  ``--cam-ablation`` adds rows without each speed-up: the eager backbone (``frozen_backbone: false``; the frozen
  graph's CAMs are compared with its CAMs), then also glibc's allocator defaults (``LIT_WSSS_KEEP_FREED_MEMORY=0``).

Both sides read CAMs in their own format: ours ``<id>.npz`` (lit_wsss.cam_files), the official ``<id>.npy``
pickled dicts (written here from the same arrays; only the official side reads them).

    .venv/bin/python benchmarks/speed_vs_official.py [--shared-data ../shared/data] [--workers 2]
        [--ir-images 40] [--cam-images 20] [--cam-few-images 2] [--cam-ablation] [--repeat 1] [--stages eval,ir,cam]

Not a test: about six minutes on a 2-core CPU; run it with nothing else on the machine.
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


def timed_process(command: list[str], repeat: int, env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    """Best wall time of ``repeat`` runs of ``command`` (start-up and exit included), and the last result."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})}
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


def cam_checkpoint(bench: Path, work: Path) -> Path:
    """A ResNet-50 CAM checkpoint from a one-step ``fit`` (2 crops of 64 px, random init). The step's learning
    rate is tiny: at the recipe's, the one step turns every classifier weight negative and all CAMs to zero."""
    out = work / "cam_fit"
    timed_process([*OURS, "fit", "--config", "experiments/voc/_base.yaml", "--config", "experiments/methods/cam.yaml",
                   f"--data.init_args.root={bench}", "--data.init_args.train_list=train", "--data.init_args.val_list=train",
                   "--data.init_args.crop_size=64", "--data.init_args.resize_long=[64,96]",
                   "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--model.init_args.backbone=resnet50",
                   "--model.init_args.pretrained=null", "--model.init_args.lr=1e-9", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                   "--trainer.num_sanity_val_steps=0", "--trainer.logger=false", f"--trainer.default_root_dir={out}",
                   "--trainer.callbacks=[{class_path: pytorch_lightning.callbacks.ModelCheckpoint, "
                   f"init_args: {{dirpath: {out}, filename: cam}}}}]"], 1)
    return out / "cam.ckpt"


def cam_export_command(bench: Path, checkpoint: Path, id_file: Path, out: Path, *writer_args: str) -> list[str]:
    """``lit-wsss predict`` of the ids in ``id_file`` with ``predict_cams.yaml`` (as ``make cams`` runs it), the
    ResNet-50 checkpoint of :func:`cam_checkpoint`, into ``out``; ``writer_args`` set its CAMWriter."""
    return [*OURS, "predict", "--config", "experiments/voc/_base.yaml", "--config", "experiments/methods/cam.yaml",
            "--config", "experiments/stages/predict_cams.yaml", f"--ckpt_path={checkpoint}",
            f"--data.init_args.root={bench}", f"--data.init_args.predict_list={id_file}",
            "--data.init_args.num_workers=1", "--model.init_args.backbone=resnet50", "--model.init_args.pretrained=null",
            f"--trainer.callbacks.init_args.out_dir={out}", "--trainer.enable_progress_bar=false", *writer_args]


def compare_cams(ours: Path, official: Path, ids: list[str]) -> tuple[float, float]:
    """Largest |difference| of ``high_res`` / ``cam`` over the ids, and the share of pixels whose mask at the
    default 0.15 differs (``ours``: CAM files; ``official``: a CAM folder or IRN's ``.npy`` dicts)."""
    from lit_wsss.cam_files import DEFAULT_BG_THRESHOLD, read_cam_file

    def arrays(folder: Path, image_id: str) -> dict:
        if (folder / f"{image_id}.npz").is_file():
            return read_cam_file(folder / f"{image_id}.npz", ("keys", "high_res", "cam"))
        record = np.load(folder / f"{image_id}.npy", allow_pickle=True).item()  # written by the official loop
        return {name: np.asarray(record[name]) for name in ("keys", "high_res", "cam")}

    largest, changed, pixels = 0.0, 0, 0
    for image_id in ids:
        a, b = arrays(ours, image_id), arrays(official, image_id)
        if not np.array_equal(a["keys"], b["keys"]):
            raise RuntimeError(f"{image_id}: keys {a['keys']} against {b['keys']}")
        for name in ("high_res", "cam"):
            largest = max(largest, float(np.abs(a[name] - b[name]).max(initial=0.0)))
        masks = [np.where(x["high_res"].max(0, initial=0) > DEFAULT_BG_THRESHOLD,
                          x["high_res"].argmax(0) + 1 if len(x["keys"]) else 0, 0) for x in (a, b)]
        changed += int((masks[0] != masks[1]).sum())
        pixels += masks[0].size
    return largest, changed / max(pixels, 1)


def per_image_and_startup(seconds: dict[int, float]) -> tuple[float, float]:
    """Seconds per image and start-up seconds of a whole process timed at two image counts: the slope and the
    intercept of the line through both points. Start-up (imports, model, checkpoint, the frozen graph) is paid
    once per export; the slope is what an export of thousands of images costs per image."""
    (few, few_s), (many, many_s) = sorted(seconds.items())
    per_image = (many_s - few_s) / (many - few)
    return per_image, few_s - few * per_image


def bench_cam(bench: Path, work: Path, images: int, few_images: int, repeat: int, ablation: bool) -> list[dict]:
    if not 0 < few_images < images:
        raise ValueError(f"--cam-few-images ({few_images}) must be between 0 and --cam-images ({images})")
    ids = read_id_list(bench / "ImageSets" / "Segmentation" / "train.txt")[:images]
    id_files = {}
    for count in (few_images, images):
        id_files[count] = work / f"cam_ids_{count}.txt"
        id_files[count].write_text("\n".join(ids[:count]) + "\n")
    checkpoint = cam_checkpoint(bench, work)
    official_s, official_out = {}, work / "cam_official"
    for count, id_file in id_files.items():
        official_out = work / f"cam_official_{count}"
        official_s[count], _ = timed_process([*OFFICIAL, "cam", "--checkpoint", str(checkpoint), "--root", str(bench),
                                              "--ids", str(id_file), "--out", str(official_out)], repeat)
    official_per_image, official_startup = per_image_and_startup(official_s)
    variants = [("frozen graph", True, "1")] + ([("eager backbone", False, "1"),
                                                  ("eager backbone, glibc allocator defaults", False, "0")]
                                                 if ablation else [])
    rows, folders = [], {}
    for name, frozen, keep in variants:
        ours_s = {}
        for count, id_file in id_files.items():
            ours_s[count] = float("inf")
            for attempt in range(repeat):  # a rerun would skip the finished ids: a new folder each time
                folder = work / f"cam_ours_{len(folders)}_{count}_{attempt}"
                frozen_arg = f"--trainer.callbacks.init_args.frozen_backbone={str(frozen).lower()}"
                seconds, _ = timed_process(cam_export_command(bench, checkpoint, id_file, folder, frozen_arg), 1,
                                           env={"LIT_WSSS_KEEP_FREED_MEMORY": keep})
                ours_s[count] = min(ours_s[count], seconds)
        folders[name] = folder  # the last run over all `images` ids
        ours_per_image, ours_startup = per_image_and_startup(ours_s)
        largest, changed = compare_cams(folders[name], official_out, ids)
        detail = f"max CAM diff {largest:.2g}, mask at 0.15 differs on {100 * changed:.3f} % of pixels"
        if name == "eager backbone":
            largest_fe, changed_fe = compare_cams(folders["frozen graph"], folders[name], ids)
            detail += f"; frozen vs eager: max diff {largest_fe:.2g}, {100 * changed_fe:.4f} % of pixels"
        rows.append({"stage": f"CAM export, ResNet-50 ({name}): s per image, slope {few_images} -> {images} images",
                     "images": len(ids), "ours": ours_per_image, "official": official_per_image,
                     "goal": 1.5 if name == "frozen graph" else None, "identical": None,
                     "detail": f"{1 / ours_per_image:.2f} vs {1 / official_per_image:.2f} images/s; {detail}"})
        rows.append({"stage": f"CAM export, ResNet-50 ({name}): whole process", "images": len(ids),
                     "ours": ours_s[images], "official": official_s[images], "goal": None, "identical": None,
                     "detail": f"start-up {ours_startup:.1f} s vs {official_startup:.1f} s"})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared-data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=None, help="first N voc12-bench images (default all)")
    parser.add_argument("--ir-images", type=int, default=40)
    parser.add_argument("--cam-images", type=int, default=20)
    parser.add_argument("--cam-few-images", type=int, default=2,
                        help="the second, small export of each side: the per-image slope is taken between the two")
    parser.add_argument("--cam-ablation", action="store_true", help="also time the export without each speed-up")
    parser.add_argument("--repeat", type=int, default=1, help="runs per process; the best wall time counts")
    parser.add_argument("--stages", default="eval,ir,cam", help="comma list of eval, ir, cam")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="speed_vs_official_") as folder:
        work = Path(folder) if args.keep is None else args.keep
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        if "eval" in stages:
            rows.append(bench_eval(args.shared_data / "voc12-bench", work, args.eval_images, args.repeat))
        if "ir" in stages:
            rows.append(bench_ir(args.shared_data / "voc12-mini", work, args.ir_images, args.workers, args.repeat))
        if "cam" in stages:
            rows += bench_cam(args.shared_data / "voc12-bench", work, args.cam_images, args.cam_few_images,
                              args.repeat, args.cam_ablation)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; load average before {load_before:.2f}, "
          f"after {os.getloadavg()[0]:.2f}\n")
    print("| stage | images | lit_wsss s | official s | ratio | goal | "
          "identical output |")
    print("|---|---:|---:|---:|---:|---:|---|")
    ok = True
    for row in rows:
        ratio = row["official"] / row["ours"]
        ok &= row["identical"] is not False and ratio >= (row["goal"] or 0.0)
        same = {True: "yes", False: "NO", None: "compared"}[row["identical"]]
        goal = f">= {row['goal']:g}x" if row["goal"] else "-"
        print(f"| {row['stage']} | {row['images']} | {row['ours']:.2f} | {row['official']:.2f} | {ratio:.2f}x | "
              f"{goal} | {same} ({row['detail']}) |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
