"""GPU readiness check (issue 18): every stage on one device in fp32, bf16-mixed and bf16-mixed + channels_last.

To be run by the person who has the CUDA machine, through ``benchmarks/gpu_check.sh`` (which installs the venv
first). On the built-in synthetic set it trains ``--steps`` steps of baseline CAM and of ``--method`` (SIPE by
default), exports the CAMs of ``--images`` held-out images, scores them with ``lit-wsss eval-cam``, exports
them again with their IR labels streamed (``CAMWriter(ir_labels=...)``: the CRF on the CPU), trains IRNet
``--steps`` steps and runs its random walk (pseudo-label predict) on the device, then prints one Markdown table:
images/s per stage and precision (measured inside the loop after ``--warmup`` batches, so start-up, data
generation and checkpoint writing are not counted) and the CAM mIoU of bf16 against fp32. Before that: torch /
CUDA / cuDNN versions and a one-process NCCL all_reduce.

A dry run on a CPU exercises every code path except CUDA itself (gloo instead of NCCL)::

    python benchmarks/gpu_stages.py --device cpu --steps 2 --images 4 --train-images 8 --batch 2 --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")

import torch  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402

from lit_wsss.stages import EXPERIMENTS, configs  # noqa: E402

VARIANTS = {  # name -> (trainer.precision, channels_last)
    "fp32": ("32-true", False),
    "bf16": ("bf16-mixed", False),
    "bf16+CL": ("bf16-mixed", True),
}


class StageTimer(Callback):
    """Images per second of the training or predict loop after ``warmup`` batches (the CUDA queue drained at
    each measured batch's ends, so the time is the device's, not the launch's). Given to the Lightning CLI as
    ``__main__.StageTimer``; the last result is read from :attr:`last`."""

    last: dict[str, float] = {}

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self.images = 0
        self.seconds = 0.0
        self._start = 0.0

    def _begin(self, batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            _sync()
            self._start = time.perf_counter()

    def _end(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch_idx >= self.warmup:
            _sync()
            self.seconds += time.perf_counter() - self._start
            self.images += len(batch["image"])
            StageTimer.last = {"images": self.images, "seconds": self.seconds}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._begin(trainer.global_step)  # batch_idx restarts every epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end(batch, trainer.global_step - 1)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._begin(batch_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._end(batch, batch_idx)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(args: list[str]) -> dict[str, float]:
    """One Lightning stage in this process; prints the command first."""
    from lit_wsss.cli import run_cli

    print("+ lit-wsss " + shlex.join(args), flush=True)
    StageTimer.last = {}
    run_cli(args)
    return dict(StageTimer.last)


def versions(device: str) -> None:
    import pytorch_lightning

    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
          f"pytorch_lightning {pytorch_lightning.__version__}, python {sys.version.split()[0]}")
    if device == "gpu":
        props = torch.cuda.get_device_properties(0)
        print(f"device 0: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
              f"capability {props.major}.{props.minor}, bf16 supported: {torch.cuda.is_bf16_supported()}, "
              f"devices visible: {torch.cuda.device_count()}")


def collective_check(device: str) -> str:
    """A one-process ``torch.distributed`` group (NCCL on the GPU, gloo in a CPU dry run) and one all_reduce."""
    import torch.distributed as dist

    backend = "nccl" if device == "gpu" else "gloo"
    target = torch.device("cuda", 0) if device == "gpu" else torch.device("cpu")
    start = time.perf_counter()
    dist.init_process_group(backend, init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
    try:
        value = torch.full((1024,), 2.0, device=target)
        dist.all_reduce(value)
        _sync()
        ok = bool((value == 2.0).all())
        nccl = f", NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}" if backend == "nccl" else ""
        verdict = "ok" if ok else "WRONG RESULT"
        line = f"{backend} all_reduce (1 process{nccl}): {verdict} in {time.perf_counter() - start:.2f} s"
    finally:
        dist.destroy_process_group()
    print(line, flush=True)
    if not ok:
        raise SystemExit(f"{backend} all_reduce returned a wrong value")
    return line


def eval_cam(cams: Path, root: Path, out: Path) -> float:
    """``lit-wsss eval-cam`` on the held-out masks; the fixed-threshold (or own-background) mIoU."""
    command = [sys.executable, "-m", "lit_wsss", "eval-cam", "--cams", str(cams), "--root", str(root), "--list",
               "val", "--num-classes", "4", "--out", str(out), "--no-progress"]
    print("+ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True)
    from lit_wsss.evaluation import headline

    return float(headline(json.loads(out.read_text()))["own"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    parser.add_argument("--out", default="outputs/gpu_check")
    parser.add_argument("--method", default="sipe", help="the method trained beside baseline CAM (sipe or cpn)")
    parser.add_argument("--steps", type=int, default=50, help="training steps of each fit")
    parser.add_argument("--warmup", type=int, default=5, help="batches of each loop left out of the timing")
    parser.add_argument("--images", type=int, default=96, help="held-out images: CAM export, IR labels, IRNet, walk")
    parser.add_argument("--train-images", type=int, default=240, help="training images of the CAM fits")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader workers")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(VARIANTS)}")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
    if args.device == "gpu" and not torch.cuda.is_available():
        raise SystemExit("--device gpu but torch.cuda.is_available() is False (driver? CUDA build of torch?)")
    if min(args.images, args.train_images) < args.batch:
        parser.error("--images and --train-images must be at least --batch")
    warmup = min(args.warmup, max(args.steps - 1, 0), max(args.images - 1, 0))
    out = Path(args.out).resolve()
    root = out / "synthetic"
    versions(args.device)
    collective = collective_check(args.device)

    from lit_wsss.datamodules.synthetic import generate_synthetic_voc

    generate_synthetic_voc(root, num_train=args.train_images, num_val=args.images, seed=0)
    loader = [f"--data.init_args.root={root}", f"--data.init_args.num_workers={args.workers}",
              f"--data.init_args.batch_size={args.batch}"]
    synthetic = [f"--data.init_args.num_train={args.train_images}", f"--data.init_args.num_val={args.images}"]
    timer = f"{{class_path: __main__.StageTimer, init_args: {{warmup: {warmup}}}}}"

    def trainer(variant: str) -> list[str]:
        precision, _ = VARIANTS[variant]
        return [f"--trainer.accelerator={args.device}", "--trainer.devices=1", f"--trainer.precision={precision}",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]

    def callbacks(variant: str) -> list[str]:
        return ["--trainer.callbacks+=lit_wsss.callbacks.ChannelsLast"] if VARIANTS[variant][1] else []

    def fit(config: list[str], variant: str, run_dir: Path) -> tuple[dict[str, float], Path]:
        checkpoint = (f"{{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: "
                      f"{{dirpath: {run_dir / 'checkpoints'}, save_last: true, save_top_k: 0}}}}")
        speed = run(["fit", *config, *loader, *trainer(variant), f"--trainer.max_steps={args.steps}",
                     "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                     "--trainer.logger=false", f"--trainer.default_root_dir={run_dir}",
                     f"--trainer.callbacks=[{checkpoint}, {timer}]", *callbacks(variant)])
        return speed, run_dir / "checkpoints" / "last.ckpt"

    def predict(config: list[str], stage_file: str, variant: str, ckpt: Path, folder: Path,
                extra: list[str], writer: tuple[str, ...] = ()) -> dict[str, float]:
        return run(["predict", *config, *loader, *extra, "--config", str(EXPERIMENTS / "stages" / stage_file),
                    *trainer(variant), f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={folder}",
                    f"--trainer.callbacks.init_args.out_dir={folder}", "--trainer.callbacks.init_args.overwrite=true",
                    *writer, f"--trainer.callbacks+={timer}", *callbacks(variant)])

    speeds: dict[str, dict[str, dict[str, float]]] = {}
    mious: dict[str, float] = {}
    ir_dir = out / "ir_labels"
    wall = time.perf_counter()
    for variant in variants:
        tag = variant.replace("+", "_")
        speeds[variant] = {}
        cam = configs("synth", "cam") + synthetic
        speeds[variant]["fit cam"], cam_ckpt = fit(cam, variant, out / tag / "cam")
        method = configs("synth", args.method) + synthetic
        speeds[variant][f"fit {args.method}"], _ = fit(method, variant, out / tag / args.method)
        cams = out / tag / "cams"
        speeds[variant]["CAM export"] = predict(cam, "predict_cams.yaml", variant, cam_ckpt, cams,
                                                ["--data.init_args.predict_list=val"])
        mious[variant] = eval_cam(cams, root, out / tag / "eval_cams.json")
        # the same export with its IR labels streamed: the CRF on the CPU beside the GPU (CAMWriter ir_labels)
        stream = json.dumps({"out_dir": str(out / tag / "ir_labels_streamed"), "workers": max(1, args.workers)})
        speeds[variant]["CAM export + IR labels streamed"] = predict(
            cam, "predict_cams.yaml", variant, cam_ckpt, out / tag / "cams_streamed",
            ["--data.init_args.predict_list=val"], (f"--trainer.callbacks.init_args.ir_labels={stream}",))
        if not ir_dir.joinpath("manifest.json").is_file():  # seeds for IRNet from the first variant's CAMs (CPU)
            from lit_wsss.stages import ir_labels

            print(f"+ lit-wsss ir-labels --cams {cams} --root {root} --list val --out {ir_dir}", flush=True)
            ir_labels(cams, root, "val", ir_dir, workers=max(1, args.workers))
        irn = configs("synth", "irn") + [f"--data.init_args.ir_label_dir={ir_dir}",
                                         f"--data.init_args.cam_dir={cams}", "--data.init_args.train_list=val"]
        speeds[variant]["fit IRNet"], irn_ckpt = fit(irn, variant, out / tag / "irn")
        speeds[variant]["random walk (pseudo labels)"] = predict(
            irn, "pseudo_labels.yaml", variant, irn_ckpt, out / tag / "pseudo_labels",
            ["--data.init_args.predict_list=val"])
    report(args, variants, speeds, mious, collective, time.perf_counter() - wall, out)
    return 0


def report(args: argparse.Namespace, variants: list[str], speeds: dict, mious: dict, collective: str,
           seconds: float, out: Path) -> None:
    def rate(entry: dict[str, float]) -> str:
        return f"{entry['images'] / entry['seconds']:.1f}" if entry and entry["seconds"] > 0 else "n/a"

    device = torch.cuda.get_device_name(0) if args.device == "gpu" else "CPU (dry run)"
    lines = [f"### lit_wsss GPU check: {device}, {args.steps} steps, batch {args.batch}, "
             f"{args.images} held-out images",
             "", "| stage (images/s) | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for stage in speeds[variants[0]]:
        lines.append(f"| {stage} | " + " | ".join(rate(speeds[v][stage]) for v in variants) + " |")
    # each variant trains and exports in its own precision: the difference is the whole bf16 chain's
    lines.append("| CAM mIoU % (eval-cam, fixed threshold 0.15) | "
                 + " | ".join(f"{100 * mious[v]:.2f}" for v in variants) + " |")
    if "fp32" in mious:
        lines.append("| mIoU difference to fp32 (points) | "
                     + " | ".join(f"{100 * (mious[v] - mious['fp32']):+.2f}" for v in variants) + " |")
    lines += ["", f"{collective}; stages took {seconds:.0f} s; files under {out}"]
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    (out / "gpu_check.md").write_text(text + "\n")
    record = {"speeds": speeds, "cam_miou": mious, "args": vars(args)}
    (out / "gpu_check.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    sys.exit(main())
