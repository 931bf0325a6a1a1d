"""``lit-wsss benchmark`` (``make benchmark``): every method under one budget, CAMs and IRN pseudo labels, one table.

For each method, ``lit-wsss pipeline`` (train -> CAMs -> eval -> IR labels -> IRNet -> pseudo labels -> eval) on
``--root``'s list with image-level labels only, every stage configured from the one budget file
(``benchmarks/budgets/cpu.yaml``): its ``data`` / ``model`` / ``trainer`` sections become arguments of every
CAM training and export, ``cam_model`` of the CAM networks only, ``irn`` of the IRNet stages, ``gslm`` and
``slams`` of those methods' extra stages. Each method runs in its own process (its peak resident memory is read
from the kernel when it ends) and its own folder ``<out>/<method>``; a method whose pseudo labels are scored is
not run again, and the pipeline skips its finished stages, so a rerun resumes. ``--cams-only`` stops each method
after its CAMs are scored (a later full run goes on from there). Then the results file
(``--results``, a markdown table, per-class IoU and a bar chart PNG beside it) is written from the folders.

The best-threshold column is chosen on the evaluation masks (an oracle, labelled as such); every other number
uses the method's own rule (fixed threshold or its own background).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lit_wsss.evaluation import headline
from lit_wsss.io import write_bytes_atomic, write_json_atomic

METHODS = ("cam", "sipe", "cpn", "vwe", "gslm", "slams")
DEFAULT_BUDGET = Path(__file__).resolve().parents[1] / "benchmarks" / "budgets" / "cpu.yaml"
# glibc returns large freed blocks to the OS and faults them back every step: 3x slower CPN steps on the CPU
# (docs/benchmarks.md, "CPU memory allocator").
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
              "MALLOC_TOP_PAD_": "1073741824"}


def read_budget(path: Path) -> dict[str, Any]:
    """The budget file as a mapping; a missing file or a non-mapping names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"budget file {path} not found (expected a YAML file like {DEFAULT_BUDGET})")
    budget = yaml.safe_load(path.read_text())
    if not isinstance(budget, dict):
        raise ValueError(f"budget file {path}: expected a mapping of sections, got {type(budget).__name__}")
    unknown = set(budget) - {"seed", "list", "sweep", "ir_workers", "data", "model", "cam_model", "trainer",
                             "irn", "gslm", "slams", "methods"}
    if unknown:
        raise ValueError(f"budget file {path}: unknown keys {sorted(unknown)}")
    return budget


def section_args(prefix: str, values: dict[str, Any] | None) -> list[str]:
    """``{"crop_size": 256}`` -> ``["--data.init_args.crop_size=256"]`` for ``prefix="data.init_args"``."""
    return [f"--{prefix}.{key}={json.dumps(value, separators=(',', ':')) if not isinstance(value, str) else value}"
            for key, value in (values or {}).items()]


def pipeline_args(method: str, budget: dict[str, Any], data: str, root: Path, out: Path) -> list[str]:
    """The ``lit-wsss pipeline`` arguments of one method under the budget."""
    seed = [f"--seed_everything={budget.get('seed', 0)}"]
    common = (section_args("data.init_args", budget.get("data")) + section_args("model.init_args", budget.get("model"))
              + section_args("trainer", budget.get("trainer")) + seed)
    extra = budget.get(method) or {}
    cam = common + section_args("model.init_args", budget.get("cam_model")) + section_args(
        "model.init_args", extra.get("cam_model"))
    encoder = common + section_args("model.init_args", extra.get("encoder_model"))
    irn = budget.get("irn") or {}
    irn_args = (section_args("data.init_args", irn.get("data")) + section_args("model.init_args", irn.get("model"))
                + section_args("trainer", irn.get("trainer")) + seed)
    args = ["--data", data, "--method", method, "--root", str(root), "--list", str(budget.get("list", "train")),
            "--out", str(out), "--workers", str(budget.get("ir_workers", 2)),
            f"--cam-args={' '.join(cam)}", f"--irn-args={' '.join(irn_args)}", f"--encoder-args={' '.join(encoder)}"]
    if budget.get("sweep"):
        args.append(f"--thresholds={budget['sweep']}")
    if method == "gslm":
        train_list = (budget.get("data") or {}).get("train_list")  # the SLM's seeds: the budget's training list
        args += [*(["--train-list", str(train_list)] if train_list else []),
                 "--gslm-rounds", str(extra.get("rounds", 1)),
                 f"--slm-args={' '.join(section_args('model.init_args', extra.get('slm_model')))}"]
    return args


def run_method(method: str, budget: dict[str, Any], data: str, root: Path, out: Path,
               cams_only: bool = False) -> dict[str, Any]:
    """Runs (or resumes) one method's pipeline in a child process; returns its timing record.

    The record's seconds add up every invocation of the method (a ``--cams-only`` run, then the rest; a failed one,
    then the rerun that resumes it); only a benchmark killed while a method runs loses that method's time.
    """
    folder = out / method
    record_path = folder / "benchmark.json"
    previous = json.loads(record_path.read_text()) if record_path.is_file() else None
    if previous and (folder / ("eval_cams.json" if cams_only else "eval_pseudo_labels.json")).is_file():
        return previous
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lit_wsss", "pipeline", *pipeline_args(method, budget, data, root, folder),
               *(["--cams-only"] if cams_only else [])]
    start = time.perf_counter()
    with (folder / "pipeline.log").open("a") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, **MALLOC_ENV, "NO_ALBUMENTATIONS_UPDATE": "1"})
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    seconds = time.perf_counter() - start
    # ru_maxrss is in KiB on Linux: the largest resident set of the pipeline process (its stages run in it).
    peak_mb = round(usage.ru_maxrss / 1024)
    if previous:
        seconds += previous["seconds"]
        peak_mb = max(peak_mb, previous["peak_rss_mb"])
    record = {"method": method, "seconds": round(seconds, 1), "peak_rss_mb": peak_mb, "command": command[2:]}
    write_json_atomic(record_path, record)  # also after a failure: the rerun that resumes adds its time to this
    if child.returncode:
        raise RuntimeError(f"{method}: lit-wsss pipeline failed (exit {child.returncode}); "
                           f"see {folder / 'pipeline.log'}")
    return record


def _scores(path: Path) -> dict[str, Any]:
    result = json.loads(path.read_text())
    return {**headline(result), "class_names": result["class_names"]}


def _share(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f} %"


def write_results(out: Path, methods: list[str], results: Path, header: list[str]) -> None:
    """The results markdown (main table + per-class CAM IoU) and a per-class bar chart PNG beside it."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, per_class = [], {}
    for method in methods:
        folder = out / method
        cam = _scores(folder / "eval_cams.json")
        timing = json.loads((folder / "benchmark.json").read_text())
        best = "- (no threshold)" if cam["best"] is None else f"{100 * cam['best']:.2f} ({cam['best_rule']})"
        pseudo_path = folder / "eval_pseudo_labels.json"
        if pseudo_path.is_file():
            pseudo = _scores(pseudo_path)
            pseudo_cell = f"{100 * pseudo['own']:.2f} ({pseudo['own_rule']})"
            pseudo_fg = _share(pseudo["own_fg"])
        else:
            pseudo_cell, pseudo_fg = "- (not run: --cams-only)", "-"
        rows.append(f"| {method} | {100 * cam['own']:.2f} ({cam['own_rule']}) | {best} | "
                    f"{pseudo_cell} | {_share(cam['own_fg'])} / {pseudo_fg} ({_share(cam['gt_fg'])}) | "
                    f"{timing['seconds'] / 60:.1f} | "
                    f"{timing['peak_rss_mb'] / 1024:.1f} |")
        per_class[method] = cam
    names = next(iter(per_class.values()))["class_names"]
    lines = [*header, "",
             "| method | CAM mIoU, own rule | CAM mIoU, best threshold (oracle: chosen on these masks) | "
             "pseudo-label mIoU after IRN, own rule | foreground share, CAMs / pseudo labels (ground truth) | "
             "time (min) | peak memory (GB) |",
             "|---|---|---|---|---|---:|---:|", *rows, "",
             "Per-class CAM IoU (%) at the best threshold (own background for methods without one):", "",
             "| class | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for index, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{100 * per_class[m]['iou'][index]:.1f}" for m in methods) + " |")
    chart = results.with_suffix(".png")
    lines += ["", f"![per-class CAM IoU]({chart.name})", ""]
    figure, axes = plt.subplots(figsize=(max(8, len(names) * 0.6), 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        axes.bar(np.arange(len(names)) + i * width, [100 * v for v in per_class[method]["iou"]], width, label=method)
    axes.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=60, ha="right")
    axes.set_ylabel("CAM IoU (%)")
    axes.legend(ncol=len(methods), fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    write_bytes_atomic(chart, buffer.getvalue())
    write_bytes_atomic(results, "\n".join(lines).encode())


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """CPU model, cores, memory and GPU of this machine, for the results header."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs, {memory_gb:.0f} GB, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lit-wsss benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/data/voc12-bench", help="VOC-layout root with masks")
    parser.add_argument("--results", default="docs/results.md", help="results markdown (a .png beside it)")
    parser.add_argument("--budget", default=str(DEFAULT_BUDGET), help="the one budget file of every method")
    parser.add_argument("--methods", default=None, help=f"comma list (default: the budget's or {','.join(METHODS)})")
    parser.add_argument("--data", default="voc", help="experiments/<data>/ (voc; synth for tests)")
    parser.add_argument("--out", default="outputs/benchmark", help="one folder per method")
    parser.add_argument("--cams-only", action="store_true",
                        help="train, export and score the CAMs only (no IRN stage, no pseudo-label column)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    budget_path = Path(args.budget)
    budget = read_budget(budget_path)
    methods = (args.methods.split(",") if args.methods else list(budget.get("methods") or METHODS))
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    root, out = Path(args.root), Path(args.out)
    if not root.is_dir():
        parser.error(f"--root {root} is not a folder")
    start = time.perf_counter()
    for index, method in enumerate(methods, 1):
        print(f"benchmark | [{index}/{len(methods)}] {method} ...", flush=True)
        record = run_method(method, budget, args.data, root, out, cams_only=args.cams_only)
        print(f"benchmark | [{index}/{len(methods)}] {method}: {record['seconds'] / 60:.1f} min, "
              f"peak {record['peak_rss_mb']} MB", flush=True)
    header = ["# Results: every method under one budget", "",
              f"- command: `lit-wsss benchmark {shlex.join(argv)}` (defaults: --root {args.root} --budget "
              f"{args.budget} --results {args.results} --out {args.out})",
              f"- commit {_commit()}; machine: {machine()}",
              f"- wall time of this invocation: {(time.perf_counter() - start) / 60:.1f} min (a method finished by "
              "an earlier invocation counts 0 here; the table's time column adds up each method's invocations)",
              f"- budget ({budget_path.name}): `{json.dumps(budget, separators=(', ', ': '))}`"]
    write_results(out, methods, Path(args.results), header)
    print(f"benchmark | results: {args.results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
