"""IRNet's pseudo labels on IRN's 512 x 512 canvas against the ``fit`` canvas (issue 18): time, label change, mIoU.

Takes a finished ``lit-wsss pipeline`` run of the VOC recipe (its ``irn/checkpoints/last.ckpt``, ``cams/`` and
``ir_labels/``; e.g. a ``make benchmark`` run folder) and runs the pseudo-label stage twice on its first
``--images`` ids, with ``--model.init_args.boundary_canvas`` ``irn`` (the default) and ``fit``, each as a whole
``lit-wsss predict`` process. Prints the wall times, the share of pixels whose label differs and the mIoU of
both label sets at IRN's fixed 0.25 (``lit-wsss eval-cam`` on the walked scores, the pipeline's measure).

    .venv/bin/python benchmarks/irn_canvas.py --run ../bench-voc12/cam/seed0 --root ../shared/data/voc12-bench \\
        [--images 120] [--irn-args "--model.init_args.backbone=efficientnet_lite0 ..."]

Not a test: minutes on a 2-core CPU; run it with nothing else on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: The IRNet arguments of the shipped CPU budget (benchmarks/budgets/cpu.yaml, section irn).
BUDGET_IRN_ARGS = ("--data.init_args.crop_size=256 --data.init_args.batch_size=16 --data.init_args.num_workers=2 "
                   "--model.init_args.backbone=efficientnet_lite0 --model.init_args.pretrained=imagenet "
                   "--model.init_args.crop_size=256")


def run(command: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a pipeline output folder (irn/, cams/, ir_labels/)")
    parser.add_argument("--root", type=Path, required=True, help="the data set root the run used")
    parser.add_argument("--images", type=int, default=120, help="first N ids of the run's CAM manifest")
    parser.add_argument("--irn-args", default=BUDGET_IRN_ARGS, help="the run's IRNet arguments")
    args = parser.parse_args(argv)
    checkpoint = args.run / "irn" / "checkpoints" / "last.ckpt"
    cams, ir_labels = args.run / "cams", args.run / "ir_labels"
    ids = sorted(json.loads((cams / "manifest.json").read_text())["images"])[: args.images]
    python = [sys.executable, "-m", "lit_wsss"]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="irn_canvas_") as folder:
        work = Path(folder)
        id_file = work / "ids.txt"
        id_file.write_text("\n".join(ids) + "\n")
        for canvas in ("irn", "fit"):
            out = work / canvas
            seconds = run([*python, "predict", "--config", "experiments/voc/_base.yaml", "--config",
                           "experiments/voc/irn.yaml", f"--data.init_args.root={args.root}",
                           *shlex.split(args.irn_args), "--config", "experiments/stages/pseudo_labels.yaml",
                           f"--data.init_args.cam_dir={cams}", f"--data.init_args.ir_label_dir={ir_labels}",
                           f"--data.init_args.predict_list={id_file}", f"--ckpt_path={checkpoint}",
                           f"--model.init_args.boundary_canvas={canvas}",
                           f"--trainer.callbacks.init_args.out_dir={out}", "--trainer.enable_progress_bar=false"])
            result = work / f"eval_{canvas}.json"
            run([*python, "eval-cam", "--cams", str(out), "--root", str(args.root), "--list", str(id_file),
                 "--out", str(result), "--no-progress"])
            rows[canvas] = {"seconds": seconds, "miou": json.loads(result.read_text())["fixed"]["miou"], "out": out}
        changed = pixels = 0
        for image_id in ids:
            a, b = (np.asarray(Image.open(rows[c]["out"] / f"{image_id}.png")) for c in ("irn", "fit"))
            changed += int((a != b).sum())
            pixels += a.size
    print(f"{len(ids)} images of {args.run}, {os.cpu_count()} CPUs\n")
    print("| canvas | pseudo-label stage s (whole process) | mIoU at 0.25 | pixels whose label differs from irn |")
    print("|---|---:|---:|---:|")
    for canvas, row in rows.items():
        share = "-" if canvas == "irn" else f"{100 * changed / pixels:.3f} %"
        print(f"| {canvas} | {row['seconds']:.1f} | {100 * row['miou']:.2f} | {share} |")
    print(f"\nspeed-up {rows['irn']['seconds'] / rows['fit']['seconds']:.2f}x, "
          f"mIoU change {100 * (rows['fit']['miou'] - rows['irn']['miou']):+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
