"""Does a fit killed with SIGKILL and resumed from its checkpoint end where an uninterrupted fit ends?

Runs the synthetic CAM recipe (``experiments/synth/_base.yaml`` + ``methods/cam.yaml`` + ``synth/cam.yaml``,
shrunk to a CPU-minute: 32 train / 8 val images, 64 px crops, random-init ResNet-18, CSV logger), each run a
``python -m lit_wsss fit`` subprocess:

(a) uninterrupted, ``--epochs`` epochs, the plain recipe (or ``--reference``: such a run made before);
(b) killed (SIGKILL to its process group, DataLoader workers included) as soon as ``last.ckpt`` of epoch
    ``--kill-epoch`` (1-based) is complete, then resumed with ``--ckpt_path`` to the same ``max_epochs``;
(c) with ``--mid-epoch``: killed once a step checkpoint in the middle of the next epoch is complete (an extra
    ``ModelCheckpoint(every_n_train_steps)``), then resumed from it.

``last.ckpt`` is the config's own (``<run>/cam/version_<n>/checkpoints/last.ckpt``, written after every epoch by
the unmonitored ``ModelCheckpoint`` of ``experiments/*/_base.yaml``); every fit carries
:class:`lit_wsss.callbacks.RNGState` (``WSSSModule.configure_callbacks``).

It prints a markdown table (final global step, final val/mIoU from the CSV log, max |weight difference| to (a)
over every tensor of the final ``last.ckpt`` state_dict, bitwise equality) and exits 0 when every resumed run
equals (a) bitwise, 1 otherwise. ``--ckpt-path last`` resumes with ``--ckpt_path last``; the CSV logger then gets a
fixed ``version: 0``, since Lightning looks for ``last`` in the NEW logger version's checkpoint folder
(empty there: training would restart from scratch with only a warning).

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/kill_resume_training.py --out /tmp/kr [--epochs 3]
        [--workers 0] [--mid-epoch] [--ckpt-path file|last] [--reference DIR]

Not a test: about a minute per run on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lit_wsss.stages import configs  # noqa: E402

NUM_TRAIN, NUM_VAL, BATCH = 32, 8, 4
STEPS_PER_EPOCH = NUM_TRAIN // BATCH  # the training loader drops the last incomplete batch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (runs, logs, synthetic data)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--kill-epoch", type=int, default=1,
                        help="kill once last.ckpt of this epoch (1-based) exists")
    parser.add_argument("--mid-epoch", action="store_true", help="also kill in the middle of the next epoch")
    parser.add_argument("--ckpt-path", choices=("file", "last"), default="file",
                        help="resume epoch-boundary kills with the path of last.ckpt or with `last`")
    parser.add_argument("--reference", type=Path,
                        help="an (a) run folder of an earlier call with the same settings")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    args = parser.parse_args(argv)
    if not 1 <= args.kill_epoch < args.epochs:
        parser.error("--kill-epoch must be at least 1 and below --epochs")
    return args


class Experiment:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = args.out.resolve()
        self.mid_step = STEPS_PER_EPOCH * args.kill_epoch + STEPS_PER_EPOCH // 2
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        for key, value in {"OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                           "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "WANDB_MODE": "offline",
                           "WANDB_SILENT": "true"}.items():
            env.setdefault(key, value)
        self.env = env

    def command(self, run: Path, ckpt_path: str | None = None, reference: bool = False) -> list[str]:
        a = self.args
        logger = {"class_path": "pytorch_lightning.loggers.CSVLogger",
                  "init_args": {"save_dir": str(run), "name": "cam"}}
        if a.ckpt_path == "last":
            logger["init_args"]["version"] = 0
        cmd = [sys.executable, "-m", "lit_wsss", "fit", *configs("synth", "cam"),
               f"--data.init_args.root={self.out / 'synthetic'}", f"--data.init_args.num_train={NUM_TRAIN}",
               f"--data.init_args.num_val={NUM_VAL}", f"--data.init_args.batch_size={BATCH}",
               f"--data.init_args.num_workers={a.workers}", "--data.init_args.crop_size=64",
               "--model.init_args.backbone=resnet18", "--model.init_args.pretrained=null",
               f"--trainer.max_epochs={a.epochs}", "--trainer.enable_progress_bar=false",
               f"--trainer.default_root_dir={run}", f"--trainer.logger={json.dumps([logger])}"]
        if a.mid_epoch and not reference:
            steps = {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                     "init_args": {"dirpath": str(run / "steps"), "filename": "step{step}", "save_top_k": -1,
                                   "every_n_train_steps": self.mid_step, "auto_insert_metric_name": False}}
            cmd.append(f"--trainer.callbacks+={json.dumps(steps)}")
        if ckpt_path is not None:
            cmd.append(f"--ckpt_path={ckpt_path}")
        return cmd

    def run(self, run: Path, name: str, ckpt_path: str | None = None,
            kill_when: Callable[[], Path | None] | None = None, reference: bool = False) -> Path | None:
        """One subprocess; with ``kill_when``, SIGKILL its process group once it returns a path."""
        run.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(run / f"{name}.log", "w") as log:
            proc = subprocess.Popen(self.command(run, ckpt_path, reference), cwd=ROOT, env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                while proc.poll() is None:
                    if time.monotonic() - started > self.args.timeout:
                        raise TimeoutError(f"{name} ran over {self.args.timeout} s ({run / f'{name}.log'})")
                    hit = kill_when() if kill_when is not None else None
                    if hit is not None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        print(f"{name}: SIGKILL after {time.monotonic() - started:.1f} s at {hit}",
                              flush=True)
                        return hit
                    time.sleep(0.05)
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"{name} exited with {proc.returncode} (log: {run / f'{name}.log'})")
        if kill_when is not None:
            raise RuntimeError(f"{name} finished before its kill point")
        print(f"{name}: finished in {time.monotonic() - started:.1f} s", flush=True)
        return None


def complete(path: Path) -> bool:
    """Written to the end (a torch zip archive has its central directory last)."""
    try:
        return path.is_file() and zipfile.is_zipfile(path)
    except OSError:
        return False


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def epoch_checkpoint(run: Path, epoch: int) -> Callable[[], Path | None]:
    """The every-epoch ``last.ckpt`` once it holds 0-based ``epoch`` (read only when it changes)."""
    seen: list[int] = [-1]

    def check() -> Path | None:
        path = config_last_checkpoint(run)
        if path is None or not complete(path):
            return None
        mtime = path.stat().st_mtime_ns
        if mtime == seen[0]:
            return None
        seen[0] = mtime
        try:
            return path if load(path)["epoch"] >= epoch else None
        except (RuntimeError, OSError, KeyError):  # replaced while reading: next poll
            seen[0] = -1
            return None

    return check


def resumed_from(path: Path) -> str:
    ckpt = load(path)
    return f"epoch {ckpt['epoch']}, step {ckpt['global_step']}"


def step_checkpoint(run: Path, step: int) -> Callable[[], Path | None]:
    path = run / "steps" / f"step{step}.ckpt"
    return lambda: path if complete(path) else None


def config_last_checkpoint(run: Path) -> Path | None:
    """The config's ``last.ckpt`` in the newest logger version (a resumed run logs into a new one)."""
    versions = sorted((run / "cam").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return versions[-1] / "checkpoints" / "last.ckpt" if versions else None


def final_checkpoint(run: Path) -> Path:
    path = config_last_checkpoint(run)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no last.ckpt under {run / 'cam'}")
    return path


def final_val_metrics(run: Path) -> dict[str, str]:
    """The last logged row with val/mIoU over every logger version, val/* columns only."""
    last: dict[str, str] = {}
    logs = sorted((run / "cam").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for path in logs:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("val/mIoU"):
                    last = {k: v for k, v in row.items() if k.startswith("val/") or k == "epoch"}
    return last


def tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested structure, keyed by its path."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found: dict[str, torch.Tensor] = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, bool]:
    """Max |a - b| over common tensors (inf on a key or shape mismatch) and bitwise equality."""
    if a.keys() != b.keys():
        return float("inf"), False
    worst, equal = 0.0, True
    for key, x in a.items():
        y = b[key]
        if x.shape != y.shape or x.dtype != y.dtype:
            return float("inf"), False
        equal &= torch.equal(x, y)
        if x.numel():
            worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst, equal


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exp = Experiment(args)
    exp.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    reference = args.reference.resolve() if args.reference else exp.out / "a_uninterrupted"
    if args.reference is None:
        exp.run(reference, "fit", reference=True)
    rows.append({"run": "(a) uninterrupted", "run_dir": reference, "resumed_from": "-"})

    killed = exp.out / "b_kill_epoch"
    ckpt = exp.run(killed, "killed", kill_when=epoch_checkpoint(killed, args.kill_epoch - 1))
    start = resumed_from(ckpt)  # before the resumed run overwrites it
    exp.run(killed, "resumed", ckpt_path="last" if args.ckpt_path == "last" else str(ckpt))
    rows.append({"run": f"(b) SIGKILL after last.ckpt of epoch {args.kill_epoch}/{args.epochs}, resumed "
                        f"(--ckpt_path {'last' if args.ckpt_path == 'last' else 'last.ckpt'})",
                 "run_dir": killed, "resumed_from": start})

    if args.mid_epoch:
        mid = exp.out / "c_kill_mid_epoch"
        ckpt = exp.run(mid, "killed", kill_when=step_checkpoint(mid, exp.mid_step))
        start = resumed_from(ckpt)
        exp.run(mid, "resumed", ckpt_path=str(ckpt))
        rows.append({"run": f"(c) SIGKILL mid-epoch {args.kill_epoch + 1} (step {exp.mid_step}), resumed",
                     "run_dir": mid, "resumed_from": start})

    final = load(final_checkpoint(reference))
    ref_weights, ref_optim = tensors(final["state_dict"]), tensors(final["optimizer_states"])
    ref_val = final_val_metrics(reference)
    all_equal = True
    lines = ["| run | resumed from | final global_step | final val/mIoU | max abs weight diff vs (a) "
             "| weights bitwise equal | optimizer state equal | all final val/* equal |",
             "|---|---|---|---|---|---|---|---|"]
    notes = []
    for row in rows:
        ckpt = load(final_checkpoint(row["run_dir"]))
        val = final_val_metrics(row["run_dir"])
        resumed = row["run_dir"] != reference
        if resumed:
            log = (row["run_dir"] / "resumed.log").read_text()
            for needle in ("dataloader is not resumable", "RNGState:", "No checkpoint will be loaded"):
                if needle in log:
                    notes.append(f"{row['run'][:3]} log: ...{needle}...")
        worst, equal = compare(ref_weights, tensors(ckpt["state_dict"]))
        optim_equal = compare(ref_optim, tensors(ckpt["optimizer_states"]))[1]
        val_equal = val == ref_val
        same = equal and val_equal and ckpt["global_step"] == final["global_step"]
        if resumed:
            all_equal &= same
        lines.append(f"| {row['run']} | {row['resumed_from']} | {ckpt['global_step']} "
                     f"| {val.get('val/mIoU', '?')} "
                     f"| {worst:.3g} | {'yes' if equal else 'no'} | {'yes' if optim_equal else 'no'} "
                     f"| {'yes' if val_equal else 'no'} |")
    print(f"\nworkers={args.workers}, epochs={args.epochs}, torch {torch.__version__}\n")
    print("\n".join(lines))
    for note in notes:
        print(f"\n{note}")
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
