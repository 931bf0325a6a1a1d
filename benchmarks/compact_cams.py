"""Compact CAM files on real CAMs (issue 18): size against IRN's per-image float32 dumps, and what changes.

Takes a finished CAM folder (e.g. a ``make benchmark`` run's ``<run>/cams``: real CAMs of a trained network) and
rewrites every file through ``lit_wsss.cam_files`` in four storages: float32 with ``high_res`` (the default, the
folder as it is), float16, float32 without ``high_res`` (``store_high_res: false``: readers upsample ``cam``) and
float16 without it. For each it prints the bytes per image against IRN's ``<id>.npy`` dicts (``keys``, ``cam``,
``high_res`` in float32, pickled: written here for the count only), ``lit-wsss eval-cam``'s mIoU at the fixed
0.15 and at the best threshold of a 0.00:0.60:0.01 sweep, the share of IR-label pixels (``lit-wsss ir-labels``
on the first ``--ir-images`` ids) that differ from the default storage's, and the largest difference of the
``cam`` array IRNet reads.

    .venv/bin/python benchmarks/compact_cams.py --cams ../bench-voc12/cam/seed0/cams \\
        --root ../shared/data/voc12-bench [--ir-images 40] [--workers 2]

Not a test: a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_wsss.cam_files import cam_path, read_cam_file, read_cam_manifest, write_cam_file  # noqa: E402

STORAGES = {"float32, high_res stored (default)": (np.float32, True), "float16, high_res stored": (np.float16, True),
            "float32, high_res from cam": (np.float32, False), "float16, high_res from cam": (np.float16, False)}


def rewrite(source: Path, out: Path, ids: list[str], dtype, store_high_res: bool, rule: str) -> int:
    """The files of ``source`` in one storage; returns the bytes written. The manifest is copied."""
    out.mkdir(parents=True)
    for image_id in ids:
        arrays = read_cam_file(cam_path(source, image_id), ("keys", "high_res", "cam", "bg"))
        write_cam_file(cam_path(out, image_id), arrays, high_res_dtype=dtype, cam_dtype=dtype,
                       high_res_rule=None if store_high_res else rule)
    (out / "manifest.json").write_bytes((source / "manifest.json").read_bytes())
    return sum(cam_path(out, i).stat().st_size for i in ids)


def official_bytes(source: Path, out: Path, ids: list[str]) -> int:
    out.mkdir(parents=True)
    for image_id in ids:
        arrays = read_cam_file(cam_path(source, image_id), ("keys", "high_res", "cam"))
        np.save(out / f"{image_id}.npy", {name: arrays[name] for name in ("keys", "cam", "high_res")},
                allow_pickle=True)
    return sum((out / f"{i}.npy").stat().st_size for i in ids)


def lit_wsss(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    result = subprocess.run([sys.executable, "-m", "lit_wsss", *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"lit-wsss {' '.join(args)} failed:\n{result.stderr[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cams", type=Path, required=True, help="a CAM folder with its manifest.json")
    parser.add_argument("--root", type=Path, required=True, help="the data set root (images, masks)")
    parser.add_argument("--ir-images", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    manifest = read_cam_manifest(args.cams, required=True)
    ids = sorted(manifest["images"])
    rule = manifest.get("high_res_rule") or "padded"
    rows = []
    with tempfile.TemporaryDirectory(prefix="compact_cams_") as folder:
        work = Path(folder)
        (work / "ids.txt").write_text("\n".join(ids) + "\n")
        (work / "ir_ids.txt").write_text("\n".join(ids[: args.ir_images]) + "\n")
        official = official_bytes(args.cams, work / "official", ids)
        for index, (name, (dtype, stored)) in enumerate(STORAGES.items()):
            out = work / f"storage{index}"
            size = rewrite(args.cams, out, ids, dtype, stored, rule)
            lit_wsss("eval-cam", "--cams", str(out), "--root", str(args.root), "--list", str(work / "ids.txt"),
                     "--thresholds", "0.0:0.6:0.01", "--out", str(work / f"eval{index}.json"), "--no-progress")
            result = json.loads((work / f"eval{index}.json").read_text())
            lit_wsss("ir-labels", "--cams", str(out), "--root", str(args.root), "--list", str(work / "ir_ids.txt"),
                     "--out", str(work / f"ir{index}"), "--workers", str(args.workers), "--no-progress")
            rows.append({"name": name, "bytes": size, "fixed": result["fixed"]["miou"],
                         "best": result["best"]["miou"], "threshold": result["best"]["threshold"], "out": out})
        changed, pixels, cam_diff = [0] * len(rows), 0, [0.0] * len(rows)
        for image_id in ids[: args.ir_images]:
            reference = np.asarray(Image.open(work / "ir0" / f"{image_id}.png"))
            pixels += reference.size
            for index in range(len(rows)):
                changed[index] += int((np.asarray(Image.open(work / f"ir{index}" / f"{image_id}.png"))
                                       != reference).sum())
        for image_id in ids:
            reference = read_cam_file(cam_path(rows[0]["out"], image_id), ("cam",))["cam"]
            for index, row in enumerate(rows):
                cam = read_cam_file(cam_path(row["out"], image_id), ("cam",))["cam"]
                cam_diff[index] = max(cam_diff[index], float(np.abs(cam - reference).max(initial=0.0)))
    print(f"{len(ids)} CAM files of {args.cams} (high_res_rule {rule}); IR labels on {args.ir_images} of them\n")
    print("| storage | KiB per image | vs IRN's .npy dicts | mIoU at 0.15 | best mIoU (threshold) | "
          "IR-label pixels changed | max diff of cam (IRNet's input) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| IRN make_cam .npy (float32, pickled) | {official / len(ids) / 1024:.1f} | 1.00x | - | - | - | - |")
    for index, row in enumerate(rows):
        print(f"| {row['name']} | {row['bytes'] / len(ids) / 1024:.1f} | {row['bytes'] / official:.3f}x | "
              f"{100 * row['fixed']:.2f} | {100 * row['best']:.2f} ({row['threshold']:.2f}) | "
              f"{100 * changed[index] / pixels:.3f} % | {cam_diff[index]:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
