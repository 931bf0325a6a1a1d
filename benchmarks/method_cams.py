"""CAM quality of each method under one budget: train -> export CAMs -> score, on ``voc12-bench`` (CPU).

For every method: ``lit-wsss fit`` with ``experiments/voc/_base.yaml`` + ``experiments/voc/<method>.yaml`` +
``experiments/voc/bench_cpu.yaml`` (EfficientNet-Lite0 ImageNet weights, seed 0, 5 epochs of the 600 images
at batch 16, 256-px crops), then ``lit-wsss predict`` of the final weights on the same 600 images and
``lit-wsss eval-cam``. Methods with a constant background get the sweep (0.0..0.60, step 0.01, for CPN
0.0..1.20) and report the fixed threshold and the best one (chosen on the evaluation masks: an oracle);
methods with their own background (SIPE) report the plain argmax.

    .venv/bin/python benchmarks/method_cams.py [--methods cam,sipe,cpn,vwe,gslm,slams] [--out outputs/bench]
        [--epochs 5] [--gslm-rounds 1]

SLAMs trains its encoder first (same budget; ``train (s)`` is the sum of both stages). GSLM runs its rounds
driver (``lit-wsss gslm``) with the bench overlay: its GLM is the baseline CAM of this budget (reused from
``<out>/cam`` when that ran, CAMs included), then ``--gslm-rounds`` SLM rounds (default 1, official 3) of
``--epochs`` each; ``train (s)`` is seeds + SLM training, the headline the last round at 0.15 + 0.1 r. The
SLM keeps the official SLM:GLM learning-rate ratio 1:100 (0.0005 here): its L_seg is a sum over images and
classes (cls.md P3) and the shared 0.05 would be 50x the official 0.001. Its pooling head is 16 x 16: the
stride-16 map of a 256-px crop (the official 32 belongs to 512-px crops).

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

from lit_wsss.benchmark import MALLOC_ENV
from lit_wsss.evaluation import headline

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"
# CPN maps are min-max normalised: its best tau lies above 0.6 (cpn.md §7); GSLM's SLM maps are absolute
# (mean of relu6 / 6, cls.md P2) and its best tau reached the top of 0..0.6 on voc12-bench.
SWEEPS = {"cpn": "0.0:1.2:0.01", "gslm": "0.0:1.0:0.01"}
# SLAMs' stage A gets bench_cpu.yaml's data, backbone and budget (its model has no CAM arguments); both stages
# run the encoder at 128 px instead of 224 to fit a CPU budget (stage B runs it on ~5 masked images per image).
ENCODER_BENCH = ["--data.init_args.train_list=train", "--data.init_args.val_list=train", "--data.init_args.crop_size=256",
                 "--data.init_args.resize_long=[192, 384]", "--data.init_args.batch_size=16",
                 "--data.init_args.num_workers=2", "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0",
                 "--trainer.num_sanity_val_steps=0", "--seed_everything=0",
                 "--model.init_args.backbone=efficientnet_lite0", "--model.init_args.pretrained=imagenet",
                 "--model.init_args.frozen_levels=2", "--model.init_args.se_size=128"]
STAGE_B_BENCH = ["--model.init_args.encoder_backbone=efficientnet_lite0", "--model.init_args.se_size=128"]
GSLM_SLM_BENCH = ["--model.init_args.lr=0.0005", "--model.init_args.pool_size=16"]


def run(args: list[str], log: Path) -> float:
    """Runs ``lit-wsss <args>`` (output to ``log``) and returns the wall time; a failure names the log."""
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call([sys.executable, "-m", "lit_wsss", *args], stdout=handle, stderr=subprocess.STDOUT,
                               cwd=REPO_ROOT, env={**os.environ, **MALLOC_ENV, "NO_ALBUMENTATIONS_UPDATE": "1",
                                                   "WANDB_MODE": "offline"})
    if code:
        raise SystemExit(f"lit-wsss {args[0]} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def bench_gslm(out: Path, root: Path, epochs: int, rounds: int) -> dict:
    """GSLM through its rounds driver; the GLM (checkpoint and train-list CAMs) is the ``cam`` run's."""
    work = out / "gslm"
    for source, target in ((out / "cam" / "checkpoints", work / "glm" / "checkpoints"),
                           (out / "cam" / "cams", work / "round0" / "cams")):
        if (source / ("last.ckpt" if source.name == "checkpoints" else "manifest.json")).is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source, target_is_directory=True)
    work.mkdir(parents=True, exist_ok=True)
    budget = f"--trainer.max_epochs={epochs}"
    run(["gslm", "--data", "voc", "--root", str(root), "--train-list", "train", "--eval-list", "train",
         "--rounds", str(rounds), "--out", str(work), "--config", str(EXPERIMENTS / "voc" / "bench_cpu.yaml"),
         f"--glm-args={budget}", f"--slm-args={' '.join([budget, *GSLM_SLM_BENCH])}"], work / "gslm.log")
    stages = {s["stage"]: s for s in json.loads((work / "gslm.json").read_text())}
    # The last round's CAMs (exported as the next round's seed CAMs), scored on the same sweep as the others;
    # the fixed threshold is the round's 0.15 + 0.1 r, recorded in their manifest.
    run(["eval-cam", "--cams", str(work / f"round{rounds}" / "cams"), "--root", str(root), "--list", "train",
         "--no-progress", "--thresholds", SWEEPS["gslm"], "--out", str(work / "eval_cams.json")], work / "eval.log")
    record: dict = {"method": "gslm", "rounds": rounds}
    seconds = [stages[f"round {r}: {name}"]["seconds"] for r in range(rounds) for name in ("seeds", "train SLM")]
    if min(seconds) > 5:  # all measured in this run, not skipped as finished
        record["train_s"] = sum(seconds)
    return {**record, **_table_entry(json.loads((work / "eval_cams.json").read_text()))}


def bench(method: str, out: Path, root: Path, epochs: int) -> dict:
    work = out / method
    work.mkdir(parents=True, exist_ok=True)
    configs = ["--config", str(EXPERIMENTS / "voc" / "_base.yaml"), "--config", str(EXPERIMENTS / "voc" / f"{method}.yaml"),
               "--config", str(EXPERIMENTS / "voc" / "bench_cpu.yaml"), f"--data.init_args.root={root}"]
    checkpoint = work / "checkpoints" / "last.ckpt"
    record: dict = {"method": method}

    def fit(args: list[str], folder: Path, name: str) -> float:
        logger = ('[{"class_path": "pytorch_lightning.loggers.CSVLogger", '
                  f'"init_args": {{"save_dir": "{folder}", "name": "{name}"}}}}]')
        callbacks = ("[{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: "
                     f"{{dirpath: {folder / 'checkpoints'}, save_last: true, save_top_k: 0}}}}]")
        return run(["fit", *args, f"--trainer.max_epochs={epochs}", f"--trainer.default_root_dir={folder}",
                    f"--trainer.logger={logger}", f"--trainer.callbacks={callbacks}"], folder / f"{name}.log")

    encoder_config = EXPERIMENTS / "voc" / f"{method}_encoder.yaml"
    if encoder_config.is_file():  # two-stage methods (SLAMs): the encoder first, same budget and backbone
        encoder = work / "encoder"
        encoder.mkdir(exist_ok=True)
        if not (encoder / "checkpoints" / "last.ckpt").is_file():
            record["encoder_s"] = fit(["--config", str(EXPERIMENTS / "voc" / "_base.yaml"), "--config", str(encoder_config),
                                       *ENCODER_BENCH, f"--data.init_args.root={root}"], encoder, "encoder")
        configs += [f"--model.init_args.encoder_checkpoint={encoder / 'checkpoints' / 'last.ckpt'}",
                    *STAGE_B_BENCH]
    if not checkpoint.is_file():
        record["train_s"] = fit(configs, work, "fit")
    cams = work / "cams"
    if not (cams / "manifest.json").is_file():
        record["export_s"] = run(["predict", *configs, "--config", str(EXPERIMENTS / "stages" / "predict_cams.yaml"),
                                  "--data.init_args.predict_list=train", f"--ckpt_path={checkpoint}",
                                  f"--trainer.callbacks.init_args.out_dir={cams}"], work / "predict.log")
    result_path = work / "eval_cams.json"
    run(["eval-cam", "--cams", str(cams), "--root", str(root), "--list", "train", "--no-progress",
         "--thresholds", SWEEPS.get(method, "0.0:0.6:0.01"), "--out", str(result_path)], work / "eval.log")
    return {**record, **_table_entry(json.loads(result_path.read_text()))}


def _table_entry(result: dict) -> dict:
    scores = headline(result)
    if scores["best"] is None:  # its own background: no threshold, the argmax is also the best
        return {"headline": scores["own"], "headline_rule": scores["own_rule"], "best": scores["own"],
                "best_rule": "(no threshold)", "num_images": result["num_images"]}
    return {"headline": scores["own"], "headline_rule": f"{scores['own_rule']} (fixed)", "best": scores["best"],
            "best_rule": f"{scores['best_rule']} (oracle)", "num_images": result["num_images"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="cam,sipe,cpn")
    parser.add_argument("--root", default=str(REPO_ROOT.parent / "shared" / "data" / "voc12-bench"))
    parser.add_argument("--out", default="outputs/bench")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--gslm-rounds", type=int, default=1, help="SLM rounds of GSLM (official: 3)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    records = []
    summary_path = out / "summary.json"
    for method in args.methods.split(","):
        root = Path(args.root).resolve()
        records.append(bench_gslm(out, root, args.epochs, args.gslm_rounds) if method == "gslm"
                       else bench(method, out, root, args.epochs))
        # Merged by method, so that runs of different --methods lists add up in one summary and a rerun that
        # reuses finished stages keeps the timings measured when they ran.
        merged = {r["method"]: r for r in (json.loads(summary_path.read_text()) if summary_path.is_file() else [])}
        for record in records:
            merged[record["method"]] = {**merged.get(record["method"], {}), **record}
        summary_path.write_text(json.dumps(list(merged.values()), indent=2))
    print(f"\n{platform.node()} | {os.cpu_count()} CPUs | voc12-bench {records[0]['num_images']} images | "
          f"{args.epochs} epochs | seed 0\n")
    print("| method | train (s) | export (s) | mIoU, default rule | best-threshold mIoU |")
    print("|---|---:|---:|---|---|")
    for r in records:
        train, export = (r.get("train_s") or 0) + (r.get("encoder_s") or 0) or None, r.get("export_s")
        print(f"| {r['method']} | {train and f'{train:.0f}' or 'reused'} | {export and f'{export:.0f}' or 'reused'} | "
              f"{100 * r['headline']:.2f} ({r['headline_rule']}) | {100 * r['best']:.2f} ({r['best_rule']}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
