"""``lit-wsss benchmark`` (``make benchmark``): every method under one budget, from image labels to a held-out
segmentation score, one table.

For each method and seed, ``lit-wsss pipeline`` (train -> CAMs -> eval -> IR labels -> IRNet -> pseudo labels ->
eval -> segmentation network -> held-out eval) with image-level labels only, every stage configured from the one
budget file (``benchmarks/budgets/cpu.yaml``): its ``data`` / ``model`` / ``trainer`` sections become arguments
of every CAM training and export, ``cam_model`` of the CAM networks only, ``irn`` of the IRNet stages,
``segmentation`` of the segmentation network, and a method's own section (``gslm``, ``slams``, ``cam``, ...) of
that method only (``seeds`` there overrides the budget's). Each run is its own process (its peak resident
memory is read from the kernel when it ends) and its own folder ``<out>/<method>/seed<k>``; a finished run is not
repeated, and the pipeline skips its finished stages, so a rerun resumes. A finished run also leaves a small run
record (its scores, time, memory, commit and the fingerprint of the budget, data and split it ran under) in
``--records`` (default ``<results stem>-runs/`` beside the results file, committed with it): a rerun with the same
budget takes a recorded run from there even when ``--out`` is gone, so one table can be built over several
sessions on machines that keep nothing but the repository. ``--cams-only`` stops each run after its CAMs are
scored (a later full run goes on from there).

Protocol. With ``split: {train: f}`` the budget's ``list`` is cut deterministically (sorted ids, an even spread:
the evaluation part is every id whose index i has ``floor((i + 1) (1 - f)) > floor(i (1 - f))``) into a training
part (CAMs, IR labels, IRNet and the segmentation network see only its image labels; its masks score the CAMs and
pseudo labels, the usual WSSS measure) and a labelled evaluation part (``<out>/lists/``) that no network trains
on: the held-out background threshold is chosen on its masks and applied to the training part, and the final
segmentation mIoU is taken on it. CAM columns: ``fixed`` (the method's own rule), ``held-out`` (threshold chosen
on the evaluation part) and ``oracle`` (chosen on the very masks it is scored on, optimistic, labelled as such).
``ground_truth: true`` adds the row "segmentation trained on ground truth": the same network on the masks of the
training part, the upper bound of the recipe. Several seeds give mean +- standard deviation (n - 1) per column.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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
GROUND_TRUTH = "ground_truth"  # the upper-bound row (lit-wsss pipeline --method ground_truth)
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
    unknown = set(budget) - {"seed", "seeds", "list", "split", "sweep", "ir_workers", "data", "model", "cam_model",
                             "trainer", "irn", "segmentation", "ground_truth", "methods", *METHODS}
    if unknown:
        raise ValueError(f"budget file {path}: unknown keys {sorted(unknown)}")
    split = budget.get("split")
    if split is not None and (not isinstance(split, dict) or set(split) != {"train"}
                              or not 0 < float(split["train"]) < 1):
        raise ValueError(f"budget file {path}: split must be {{train: f}} with 0 < f < 1, got {split!r}")
    return budget


def budget_seeds(budget: dict[str, Any], method: str) -> list[int]:
    """The seeds of a method: its own section's ``seeds``, else the budget's ``seeds``, else ``[seed]``."""
    section = budget.get(method) if isinstance(budget.get(method), dict) else {}
    seeds = section.get("seeds") or budget.get("seeds") or [budget.get("seed", 0)]
    return [int(seed) for seed in seeds]


def split_ids(ids: list[str], train_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split of sorted ids: (training part, evaluation part), the evaluation part spread evenly."""
    from fractions import Fraction

    ordered = sorted(ids)
    rate = 1 - Fraction(str(train_fraction))  # exact: 0.8 gives every fifth id, with no float rounding
    evaluation = {i for i in range(len(ordered)) if math.floor((i + 1) * rate) > math.floor(i * rate)}
    if not evaluation or len(evaluation) == len(ordered):
        raise ValueError(f"split train={train_fraction} of {len(ordered)} ids leaves a part empty")
    return ([x for i, x in enumerate(ordered) if i not in evaluation],
            [x for i, x in enumerate(ordered) if i in evaluation])


def write_split(budget: dict[str, Any], root: Path, out: Path) -> dict[str, str] | None:
    """``<out>/lists/{train_part,eval_part}.txt`` from the budget's ``list`` and ``split``; None without a split."""
    if not budget.get("split"):
        return None
    from lit_wsss.datamodules.files import read_id_list, resolve_list

    train, evaluation = split_ids(read_id_list(resolve_list(root, str(budget.get("list", "train")))),
                                  float(budget["split"]["train"]))
    folder = out / "lists"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"train": folder / "train_part.txt", "eval": folder / "eval_part.txt"}
    for name, ids in (("train", train), ("eval", evaluation)):
        write_bytes_atomic(paths[name], ("\n".join(ids) + "\n").encode())
    return {name: str(path) for name, path in paths.items()}


def section_args(prefix: str, values: dict[str, Any] | None) -> list[str]:
    """``{"crop_size": 256}`` -> ``["--data.init_args.crop_size=256"]`` for ``prefix="data.init_args"``."""
    return [f"--{prefix}.{key}={json.dumps(value, separators=(',', ':')) if not isinstance(value, str) else value}"
            for key, value in (values or {}).items()]


def pipeline_args(method: str, budget: dict[str, Any], data: str, root: Path, out: Path, seed: int | None = None,
                  lists: dict[str, str] | None = None) -> list[str]:
    """The ``lit-wsss pipeline`` arguments of one method (``ground_truth``: the upper-bound row) under the budget.

    ``lists`` (from :func:`write_split`) replace the budget's list by the training part everywhere and add the
    evaluation part as the threshold and segmentation evaluation list.
    """
    seed = [f"--seed_everything={budget.get('seed', 0) if seed is None else seed}"]
    data_section = dict(budget.get("data") or {})
    if lists:
        data_section.update(train_list=lists["train"], val_list=lists["train"])
    common = (section_args("data.init_args", data_section) + section_args("model.init_args", budget.get("model"))
              + section_args("trainer", budget.get("trainer")) + seed)
    extra = budget.get(method) if isinstance(budget.get(method), dict) else {}
    cam = common + section_args("model.init_args", budget.get("cam_model")) + section_args(
        "model.init_args", extra.get("cam_model"))
    encoder = common + section_args("model.init_args", extra.get("encoder_model"))
    irn = budget.get("irn") or {}
    irn_args = (section_args("data.init_args", irn.get("data")) + section_args("model.init_args", irn.get("model"))
                + section_args("trainer", irn.get("trainer")) + seed)
    segmentation = budget.get("segmentation") or {}
    seg_data = {key: value for key, value in (budget.get("data") or {}).items()
                if key not in ("train_list", "val_list", "crop_size", "resize_long", "batch_size")}
    seg_args = (section_args("data.init_args", {**seg_data, **(segmentation.get("data") or {})})
                + section_args("model.init_args", segmentation.get("model"))
                + section_args("trainer", segmentation.get("trainer")) + seed)
    training_list = lists["train"] if lists else str(budget.get("list", "train"))
    args = ["--data", data, "--method", method, "--root", str(root), "--list", training_list,
            "--out", str(out), "--workers", str(budget.get("ir_workers", 2)),
            f"--cam-args={' '.join(cam)}", f"--irn-args={' '.join(irn_args)}", f"--encoder-args={' '.join(encoder)}",
            f"--seg-args={' '.join(seg_args)}"]
    if lists:
        args += ["--seg-eval-list", lists["eval"]]
        if method != "ground_truth":
            args += ["--threshold-list", lists["eval"]]
    if budget.get("sweep"):
        args.append(f"--thresholds={budget['sweep']}")
    if method == "gslm":
        train_list = data_section.get("train_list")  # the SLM's seeds: the budget's training list
        args += [*(["--train-list", str(train_list)] if train_list else []),
                 "--gslm-rounds", str(extra.get("rounds", 1)),
                 f"--slm-args={' '.join(section_args('model.init_args', extra.get('slm_model')))}"]
    return args


def run_fingerprint(budget: dict[str, Any], data: str, root: Path, lists: dict[str, str] | None) -> str:
    """What makes two runs of a method and seed the same experiment: the budget, the data config, the root's name
    and the ids of the split (not the machine's paths, so that a record travels with the repository)."""
    split = {name: Path(path).read_text().split() for name, path in (lists or {}).items()}
    identity = json.dumps({"budget": budget, "data": data, "root": Path(root).resolve().name, "split": split},
                          sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def record_path(records: Path, method: str, seed: int) -> Path:
    return records / f"{method}-seed{seed}.json"


def read_record(records: Path | None, method: str, seed: int, fingerprint: str | None) -> dict[str, Any] | None:
    """A finished run's record made under the same fingerprint; None when absent or made under another budget."""
    if records is None or fingerprint is None:
        return None
    path = record_path(records, method, seed)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("fingerprint") == fingerprint else None


def _finished(folder: Path, cams_only: bool, method: str) -> bool:
    """Whether a run's last scored file exists (a rerun then skips it)."""
    if cams_only:
        return method == GROUND_TRUTH or (folder / "eval_cams.json").is_file()
    return (folder / "eval_segmentation.json").is_file()


def run_method(method: str, budget: dict[str, Any], data: str, root: Path, out: Path, cams_only: bool = False,
               seed: int | None = None, lists: dict[str, str] | None = None, records: Path | None = None,
               fingerprint: str | None = None) -> dict[str, Any]:
    """Runs (or resumes) one method's pipeline for one seed in a child process; returns its timing record.

    The run's folder is ``<out>/<method>/seed<seed>``. The record's seconds add up every invocation of the run (a
    ``--cams-only`` run, then the rest; a failed one, then the rerun that resumes it); only a benchmark killed
    while a run is going loses that run's time. With ``records``, a full run recorded there under the same
    ``fingerprint`` is not run again, and a full run that finishes is recorded there.
    """
    seed = budget.get("seed", 0) if seed is None else seed
    recorded = read_record(records, method, seed, fingerprint)
    if recorded is not None:
        return recorded["timing"]
    folder = out / method / f"seed{seed}"
    record_path = folder / "benchmark.json"
    previous = json.loads(record_path.read_text()) if record_path.is_file() else None
    if previous and _finished(folder, cams_only, method):
        _record(records, fingerprint, method, seed, folder, cams_only)
        return previous
    if cams_only and method == GROUND_TRUTH:
        return {"method": method, "seconds": 0.0, "peak_rss_mb": 0, "command": []}
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lit_wsss", "pipeline",
               *pipeline_args(method, budget, data, root, folder, seed, lists), *(["--cams-only"] if cams_only else [])]
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
    record = {"method": method, "seed": seed, "seconds": round(seconds, 1), "peak_rss_mb": peak_mb,
              "command": command[2:]}
    write_json_atomic(record_path, record)  # also after a failure: the rerun that resumes adds its time to this
    if child.returncode:
        raise RuntimeError(f"{method} (seed {seed}): lit-wsss pipeline failed (exit {child.returncode}); "
                           f"see {folder / 'pipeline.log'}")
    _record(records, fingerprint, method, seed, folder, cams_only)
    return record


def _record(records: Path | None, fingerprint: str | None, method: str, seed: int, folder: Path,
            cams_only: bool) -> None:
    """The run record of a finished full run: what the table reads from its folder, plus where it came from."""
    if records is None or fingerprint is None or cams_only or not _finished(folder, False, method):
        return
    records.mkdir(parents=True, exist_ok=True)
    write_json_atomic(record_path(records, method, seed),
                      {"method": method, "seed": seed, "fingerprint": fingerprint, "commit": _commit(),
                       "machine": machine(), **run_scores(folder)})


def _share(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f} %"


def _mean_std(values: list[float | None], note: str = "") -> str:
    """``mean +- std (n)`` in percent over the seeds; one value alone; ``-`` without any."""
    present = [100 * v for v in values if v is not None]
    if not present:
        return "-" + (f" ({note})" if note else "")
    if len(present) == 1:
        return f"{present[0]:.2f}" + (f" ({note})" if note else "")
    mean = sum(present) / len(present)
    std = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))
    return f"{mean:.2f} ± {std:.2f} (n={len(present)})" + (f", {note}" if note else "")


def run_scores(folder: Path) -> dict[str, Any]:
    """What the table reads from one run's folder (missing stages are None)."""
    def read(name: str) -> dict[str, Any] | None:
        path = folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    cams, pseudo = read("eval_cams.json"), read("eval_pseudo_labels.json")
    held_out, segmentation = read("eval_cams_held_out.json"), read("eval_segmentation.json")
    scores: dict[str, Any] = {"timing": read("benchmark.json"), "cam": None, "pseudo": None,
                              "held_out": held_out, "segmentation": segmentation}
    if cams is not None:
        scores["cam"] = {**headline(cams), "class_names": cams["class_names"]}
    if pseudo is not None:
        scores["pseudo"] = headline(pseudo)
    return scores


def write_results(out: Path, methods: list[str], results: Path, header: list[str],
                  seeds: dict[str, list[int]] | None = None, records: Path | None = None,
                  fingerprint: str | None = None) -> None:
    """The results markdown (main table + per-class CAM IoU of the first seed) and a per-class bar chart PNG.

    Each run's scores come from its record (``records``, same ``fingerprint``) where there is one, else from its
    folder under ``out``."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seeds = seeds or {}
    rows, per_class = [], {}
    for method in methods:
        runs = [read_record(records, method, seed, fingerprint) or run_scores(out / method / f"seed{seed}")
                for seed in seeds.get(method, [0])]
        timing = [r["timing"] for r in runs if r["timing"]]
        minutes = sum(t["seconds"] for t in timing) / 60
        peak = max((t["peak_rss_mb"] for t in timing), default=0) / 1024
        segmentation = _mean_std([r["segmentation"]["miou"] if r["segmentation"] else None for r in runs])
        if method == GROUND_TRUTH:
            rows.append(f"| segmentation trained on ground truth (upper bound) | - | - | - | - | {segmentation} | - | "
                        f"{minutes:.1f} | {peak:.1f} |")
            continue
        cams = [r["cam"] for r in runs if r["cam"]]
        if not cams:  # a benchmark that stops part-way (or --methods in several sessions): say so, go on
            rows.append(f"| {method} | - (not run yet) |" + " |" * 5 + f" {minutes:.1f} | {peak:.1f} |")
            continue
        first = cams[0]
        own = _mean_std([c["own"] for c in cams], first["own_rule"] if len(cams) == 1 else "")
        best = ("- (no threshold)" if first["best"] is None
                else _mean_std([c["best"] for c in cams], first["best_rule"] if len(cams) == 1 else ""))
        held = [r["held_out"] for r in runs if r["held_out"]]
        if not held:
            held_cell = "- (no split)"
        elif held[0]["miou"] is None:
            held_cell = "- (own background)"
        else:
            held_cell = _mean_std([h["miou"] for h in held], f"tau = {held[0]['threshold']:g}" if len(held) == 1 else "")
        pseudo = [r["pseudo"] for r in runs if r["pseudo"]]
        if pseudo:
            pseudo_cell = _mean_std([p["own"] for p in pseudo], pseudo[0]["own_rule"] if len(pseudo) == 1 else "")
            pseudo_fg = _share(pseudo[0]["own_fg"])
        else:
            pseudo_cell, pseudo_fg = "- (not run: --cams-only)", "-"
        if not any(r["segmentation"] for r in runs):
            segmentation = "- (not run)"
        rows.append(f"| {method} | {own} | {held_cell} | {best} | {pseudo_cell} | {segmentation} | "
                    f"{_share(first['own_fg'])} / {pseudo_fg} ({_share(first['gt_fg'])}) | {minutes:.1f} | {peak:.1f} |")
        per_class[method] = first
    cam_methods = [m for m in methods if m in per_class]
    lines = [*header, "",
             "| method | CAM mIoU, fixed (own rule) | CAM mIoU, held-out threshold (chosen on the evaluation part) | "
             "CAM mIoU, oracle threshold (chosen on these masks) | pseudo-label mIoU after IRN, own rule | "
             "segmentation mIoU, held-out evaluation part | foreground share, CAMs / pseudo labels (ground truth) | "
             "time (min) | peak memory (GB) |",
             "|---|---|---|---|---|---|---|---:|---:|", *rows, ""]
    if not cam_methods:
        write_bytes_atomic(results, "\n".join(lines).encode())
        return
    names = per_class[cam_methods[0]]["class_names"]
    lines += ["Per-class CAM IoU (%) at the oracle threshold (own background for methods without one), first seed:", "",
              "| class | " + " | ".join(cam_methods) + " |", "|---|" + "---:|" * len(cam_methods)]
    for index, name in enumerate(names):
        lines.append(f"| {name} | " + " | ".join(f"{100 * per_class[m]['iou'][index]:.1f}" for m in cam_methods) + " |")
    chart = results.with_suffix(".png")
    lines += ["", f"![per-class CAM IoU]({chart.name})", ""]
    figure, axes = plt.subplots(figsize=(max(8, len(names) * 0.6), 4))
    width = 0.8 / len(cam_methods)
    for i, method in enumerate(cam_methods):
        axes.bar(np.arange(len(names)) + i * width, [100 * v for v in per_class[method]["iou"]], width, label=method)
    axes.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=60, ha="right")
    axes.set_ylabel("CAM IoU (%)")
    axes.legend(ncol=len(cam_methods), fontsize="small")
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
    parser.add_argument("--records", default=None,
                        help="run records of finished runs (default: <results stem>-runs/ beside --results)")
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
    lists = write_split(budget, root, out)
    results = Path(args.results)
    records = Path(args.records) if args.records else results.parent / f"{results.stem}-runs"
    fingerprint = run_fingerprint(budget, args.data, root, lists)
    rows = [*methods, *([GROUND_TRUTH] if budget.get("ground_truth") else [])]
    seeds = {method: budget_seeds(budget, method) for method in rows}
    # every row's first seed before any row's second: a benchmark stopped part-way has compared every method once
    runs = [(method, seeds[method][k]) for k in range(max(map(len, seeds.values())))
            for method in rows if k < len(seeds[method])]
    for index, (method, seed) in enumerate(runs, 1):
        print(f"benchmark | [{index}/{len(runs)}] {method} seed {seed} ...", flush=True)
        record = run_method(method, budget, args.data, root, out, cams_only=args.cams_only, seed=seed, lists=lists,
                            records=records, fingerprint=fingerprint)
        print(f"benchmark | [{index}/{len(runs)}] {method} seed {seed}: {record['seconds'] / 60:.1f} min, "
              f"peak {record['peak_rss_mb']} MB", flush=True)
        _write_table(args, argv, budget, budget_path, out, rows, seeds, lists, start, done=index == len(runs),
                     records=records, fingerprint=fingerprint)
    print(f"benchmark | results: {args.results}", flush=True)
    return 0


def _write_table(args: argparse.Namespace, argv: list[str], budget: dict[str, Any], budget_path: Path, out: Path,
                 rows: list[str], seeds: dict[str, list[int]], lists: dict[str, str] | None, start: float,
                 done: bool, records: Path, fingerprint: str) -> None:
    """The results file, rewritten after every run so that a benchmark stopped part-way still shows its table."""
    header = ["# Results: every method under one budget", "",
              f"- command: `lit-wsss benchmark {shlex.join(argv)}` (defaults: --root {args.root} --budget "
              f"{args.budget} --results {args.results} --out {args.out})",
              f"- commit {_commit()}; machine: {machine()}",
              f"- wall time of this invocation: {(time.perf_counter() - start) / 60:.1f} min (a method finished by "
              "an earlier invocation counts 0 here; the table's time column adds up each method's invocations)",
              f"- budget ({budget_path.name}): `{json.dumps(budget, separators=(', ', ': '))}`"]
    if not done:
        header.append("- **incomplete**: this invocation is still running or was stopped; rerun the same command "
                      "to resume (finished runs are skipped)")
    if lists:
        header.append(f"- split: training part `{lists['train']}`, evaluation part `{lists['eval']}` (budget's split "
                      f"{budget['split']} of list {budget.get('list', 'train')}, by sorted id)")
    header.append(f"- run records: `{records}` (fingerprint {fingerprint}; a record names the commit and machine "
                  "of its run)")
    write_results(out, rows, Path(args.results), header, seeds, records, fingerprint)


if __name__ == "__main__":
    sys.exit(main())
