"""CAM quality of each method under one budget: train -> export CAMs -> score, on ``voc12-bench`` (CPU).

For every method: ``lit-wsss fit`` with ``experiments/voc/_base.yaml`` + ``experiments/voc/<method>.yaml`` +
``experiments/voc/bench_cpu.yaml`` (EfficientNet-Lite0 ImageNet weights, seed 0, 5 epochs of the 600 images
at batch 16, 256-px crops), then ``lit-wsss predict`` of the final weights on the same 600 images and
``lit-wsss eval-cam``. Methods with a constant background get the sweep (0.0..0.60, step 0.01, for CPN
0.0..1.20) and report the fixed threshold and the best one (chosen on the evaluation masks: an oracle);
methods with their own background (SIPE) report the plain argmax.

    .venv/bin/python benchmarks/method_cams.py [--methods cam,sipe,cpn] [--out outputs/bench] [--epochs 5]

Not a test: tens of minutes per method on a 2-core CPU. Finished stages are reused on a rerun (delete
``--out`` to start over). Prints a markdown table and writes ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"
SWEEPS = {"cpn": "0.0:1.2:0.01"}  # CPN maps are min-max normalised: its best tau lies above 0.6 (cpn.md §7)


def run(args: list[str], log: Path) -> float:
    """Runs ``lit-wsss <args>`` (output to ``log``) and returns the wall time; a failure names the log."""
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call([sys.executable, "-m", "lit_wsss", *args], stdout=handle, stderr=subprocess.STDOUT,
                               cwd=REPO_ROOT, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"})
    if code:
        raise SystemExit(f"lit-wsss {args[0]} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def bench(method: str, out: Path, root: Path, epochs: int) -> dict:
    work = out / method
    work.mkdir(parents=True, exist_ok=True)
    configs = ["--config", str(EXPERIMENTS / "voc" / "_base.yaml"), "--config", str(EXPERIMENTS / "voc" / f"{method}.yaml"),
               "--config", str(EXPERIMENTS / "voc" / "bench_cpu.yaml"), f"--data.init_args.root={root}"]
    checkpoint = work / "checkpoints" / "last.ckpt"
    record: dict = {"method": method}
    if not checkpoint.is_file():
        logger = ('[{"class_path": "pytorch_lightning.loggers.CSVLogger", '
                  f'"init_args": {{"save_dir": "{work}", "name": "{method}"}}}}]')
        callbacks = ("[{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: "
                     f"{{dirpath: {work / 'checkpoints'}, save_last: true, save_top_k: 0}}}}]")
        record["train_s"] = run(["fit", *configs, f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={work}",
                                 f"--trainer.logger={logger}", f"--trainer.callbacks={callbacks}"], work / "fit.log")
    cams = work / "cams"
    if not (cams / "manifest.json").is_file():
        record["export_s"] = run(["predict", *configs, "--config", str(EXPERIMENTS / "stages" / "predict_cams.yaml"),
                                  "--data.init_args.predict_list=train", f"--ckpt_path={checkpoint}",
                                  f"--trainer.callbacks.init_args.out_dir={cams}"], work / "predict.log")
    result_path = work / "eval_cams.json"
    run(["eval-cam", "--cams", str(cams), "--root", str(root), "--list", "train", "--no-progress",
         "--thresholds", SWEEPS.get(method, "0.0:0.6:0.01"), "--out", str(result_path)], work / "eval.log")
    result = json.loads(result_path.read_text())
    if result["mode"] == "bg_argmax":
        record.update(headline=result["bg_argmax"]["miou"], headline_rule="argmax with its own bg",
                      best=result["bg_argmax"]["miou"], best_rule="(no threshold)")
    else:
        record.update(headline=result["fixed"]["miou"], headline_rule=f"tau = {result['fixed']['threshold']:g} (fixed)",
                      best=result["best"]["miou"], best_rule=f"tau = {result['best']['threshold']:g} (oracle)")
    record["num_images"] = result["num_images"]
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="cam,sipe,cpn")
    parser.add_argument("--root", default=str(REPO_ROOT.parent / "shared" / "data" / "voc12-bench"))
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    records = []
    for method in args.methods.split(","):
        records.append(bench(method, out, Path(args.root).resolve(), args.epochs))
        (out / "summary.json").write_text(json.dumps(records, indent=2))
    print(f"\n{platform.node()} | {os.cpu_count()} CPUs | voc12-bench {records[0]['num_images']} images | "
          f"{args.epochs} epochs | seed 0\n")
    print("| method | train (s) | export (s) | mIoU, default rule | best-threshold mIoU |")
    print("|---|---:|---:|---|---|")
    for r in records:
        train, export = r.get("train_s"), r.get("export_s")
        print(f"| {r['method']} | {train and f'{train:.0f}' or 'reused'} | {export and f'{export:.0f}' or 'reused'} | "
              f"{100 * r['headline']:.2f} ({r['headline_rule']}) | {100 * r['best']:.2f} ({r['best_rule']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
