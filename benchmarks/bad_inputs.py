"""A reproducible catalogue of bad inputs and faults against the lit_wsss command line (docs/reliability.md).

Every case breaks one thing in a fresh copy of a small fixture, runs one ``lit-wsss`` command in a subprocess
(``python -m lit_wsss ...``, cwd = the case's own folder, timeout 300 s) and records what the user sees:

* the exit code;
* the message: the first stderr line containing "error" (case-insensitive; the frame lines of a Python
  traceback are skipped, its exception lines are not) with the indented lines that continue it (where
  argparse and jsonargparse name the offending key), else the last stderr line;
* whether a Python ``Traceback`` appeared;
* whether the message names the broken file / key / value (each case gives the expected substring), or only a
  later error or exception line does;
* leftovers: new ``*.tmp`` / ``.*.tmp`` files anywhere under the case folder, and partial outputs in the
  output folders the case names (a result file that should not exist, a CAM folder without manifest.json, an
  IR-label folder whose manifest says ``complete: false``, checkpoints holding non-finite tensors, an input
  folder that was modified).

Verdicts: ``clear`` (non-zero exit, the message names the expected thing, no leftovers), ``traceback`` (named,
but only after / inside a traceback), ``silent`` (exit 0 on a bad input, or a fault that ends with exit 0 and
wrong files), ``unclear`` (non-zero exit, the expected thing is not named), ``leftover`` (non-zero exit but
leftovers remain). Controls (good inputs, and the faults whose right outcome is a success) are ``ok`` when
they succeed with correct output; ``warned`` is an exit 0 on a bad input with a stderr line (a warning) that
names the expected thing.

Fixtures (built once under ``--work``, default a new temporary folder): a VOC-layout root of 6 voc12-mini
images (4 train, 2 val, masks, lists, cls_labels.json), a 4-class folder data set made from the same images
(examples/folder_from_voc.py, masks renumbered), a CAM folder of each (``lit-wsss predict``, resnet18 random
init, CAM scale 1.0), IR labels of the VOC CAMs, a copy of the masks as segmentation predictions, a root of 60
more voc12-mini images (half size) with its clean CAM export for the export faults, and weights files (a
resnet18 state dict, an empty file, random bytes, a truncated zip, a pickled custom object).

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bad_inputs.py --out /tmp/bad_inputs.md
    ... --only 'weights-*,CAMs'    (fnmatch on the case id, or an area; extended cases included)
    ... --extended                 (also the extended cases: more variants of the same checks)
    ... --list                     (print the case ids and exit)

Writes the markdown table to stdout and ``--out FILE.md``, the raw results to ``FILE.json`` beside it. The
script uses only the command line, the file formats and long-standing helpers of lit_wsss
(``load_cls_labels``, ``save_labels_json``, ``palette_png_bytes``), so it runs against older and newer
checkouts alike (the checkout under test is the one Python imports: PYTHONPATH).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import importlib.util
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

TIMEOUT = 300
#: 6 voc12-mini ids whose classes are only aeroplane, bicycle, person and train (the folder set's 4 classes)
TRAIN_IDS = ["2007_000032", "2007_000042", "2007_002266", "2007_000572"]
VAL_IDS = ["2007_003848", "2007_002619"]
ALL_IDS = TRAIN_IDS + VAL_IDS
FOLDER_CLASSES = ["aeroplane", "bicycle", "person", "train"]
#: VOC mask value -> folder data set mask value
FOLDER_REMAP = {0: 0, 1: 1, 2: 2, 15: 3, 19: 4, 255: 255}
#: images of the export faults (a kill or a second writer must land while the first one is still writing)
EXPORT_IMAGES = 60
#: their size: half of VOC's (the faults need many files, not large ones)
EXPORT_SCALE = 0.5


# --------------------------------------------------------------------------------------------------- locate


def locate_repo() -> Path:
    """The lit_wsss checkout under test: the one Python imports (PYTHONPATH), else this file's repository."""
    spec = importlib.util.find_spec("lit_wsss")
    if spec is None or spec.origin is None:
        here = Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(here))
        spec = importlib.util.find_spec("lit_wsss")
        if spec is None or spec.origin is None:
            raise SystemExit("lit_wsss is not importable: run with PYTHONPATH=<the lit_wsss checkout>")
    return Path(spec.origin).resolve().parents[1]


REPO = locate_repo()
EXP = REPO / "experiments"


def run_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONPATH", str(REPO))
    for key, value in (("OMP_NUM_THREADS", "1"), ("NO_ALBUMENTATIONS_UPDATE", "1"),
                       ("JSONARGPARSE_DEPRECATION_WARNINGS", "off"), ("WANDB_MODE", "offline"),
                       ("WANDB_SILENT", "true")):
        env.setdefault(key, value)
    return env


# --------------------------------------------------------------------------------------------------- argv


@dataclass
class Macro:
    """A run of arguments shown by name in the table (the legend gives its expansion)."""

    name: str
    args: list[str]


def flatten(argv: list[Any]) -> list[str]:
    out: list[str] = []
    for item in argv:
        out.extend(item.args if isinstance(item, Macro) else [str(item)])
    return out


def lit(*args: Any) -> list[Any]:
    return [sys.executable, "-m", "lit_wsss", *args]


def cfg(data: str, method: str = "cam", *extra: str) -> list[str]:
    """``lit_wsss.stages.configs`` rebuilt from the file layout (works on old and new checkouts)."""
    files = [EXP / data / "_base.yaml"]
    files += [p for p in (EXP / "methods" / f"{method}.yaml", EXP / data / f"{method}.yaml") if p.is_file()]
    files += [EXP / e for e in extra]
    return [a for p in files for a in ("--config", str(p))]


TINY = Macro("TINY", [
    "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.crop_size=64",
    "--data.init_args.resize_long=[64,96]", "--model.init_args.backbone=resnet18",
    "--model.init_args.pretrained=null", "--model.init_args.cam_scales=[1.0]", "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
])
#: 2 batches: every one of the 4 train images (batch 2) and both val images (batch 1) is read
FAST = "--trainer.fast_dev_run=2"
PREDICT_ARGS = Macro("PRED", [
    "--data.init_args.num_workers=0", "--model.init_args.backbone=resnet18",
    "--model.init_args.pretrained=null", "--model.init_args.cam_scales=[1.0]", "--trainer.accelerator=cpu",
    "--trainer.enable_progress_bar=false",
])


def csv_logger(save_dir: Path) -> str:
    """The experiment files' loggers (CSV + offline W&B) replaced by one CSV logger (tests/test_cli.py)."""
    return ('--trainer.logger=[{"class_path": "pytorch_lightning.loggers.CSVLogger", '
            f'"init_args": {{"save_dir": "{save_dir}", "name": "cam"}}}}]')


def checkpoint_every_step(folder: Path) -> Macro:
    """A ModelCheckpoint every training step, all kept (replacing the experiment files' callbacks)."""
    return Macro("CKPT_EVERY_STEP", [
        '--trainer.callbacks=[{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": '
        f'{{"dirpath": "{folder}", "every_n_train_steps": 1, "save_top_k": -1}}}}]'])


# --------------------------------------------------------------------------------------------------- fixtures


class Fixtures:
    """Every fixture, built once under ``work/fixtures``."""

    def __init__(self, work: Path, shared: Path) -> None:
        self.root = work / "fixtures"
        self.shared = shared
        self.mini = shared / "voc12-mini"
        self.log: list[dict[str, Any]] = []

    def path(self, name: str) -> Path:
        return self.root / name

    def build(self) -> float:
        """Build every fixture (0 s when ``done.json`` says they were built by this same checkout)."""
        start = time.perf_counter()
        producer = {"repo": str(REPO), "commit": git_commit(REPO), "shared": str(self.shared)}
        done = self.root / "done.json"
        if done.is_file() and json.loads(done.read_text()).get("producer") == producer:
            return 0.0
        if self.root.exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True)
        from lit_wsss.datamodules.labels import VOC_CLASSES, load_cls_labels, save_labels_json

        labels = load_cls_labels(self.shared / "voc12" / "cls_labels.npy", len(VOC_CLASSES))
        self._voc(labels, save_labels_json, VOC_CLASSES)
        self._folder(labels, VOC_CLASSES)
        self._voc_big(labels, save_labels_json, VOC_CLASSES)
        self._weights()
        shutil.copytree(self.path("voc") / "SegmentationClass", self.path("preds"))
        # CAMs: lit-wsss predict with resnet18 at random init (seed 0), as tests/test_cli.py does
        stage = "stages/predict_cams.yaml"
        self._predict("cams", cfg("voc", "cam", stage), self.path("voc"), "all")
        self._predict("folder_cams", cfg("folder", "cam", stage), self.path("folder"), "all")
        self._predict("export_ref", cfg("voc", "cam", stage), self.path("voc_big"), "export")
        self._run("ir", lit("ir-labels", "--cams", self.path("cams"), "--root", self.path("voc"),
                            "--list", "train", "--out", self.path("ir"), "--workers", "1", "--no-progress"))
        seconds = time.perf_counter() - start
        done.write_text(json.dumps({"producer": producer, "seconds": seconds, "steps": self.log}, indent=1))
        return seconds

    def _run(self, name: str, argv: list[Any]) -> None:
        start = time.perf_counter()
        proc = subprocess.run(flatten(argv), cwd=self.root, env=run_env(), capture_output=True, text=True,
                              timeout=TIMEOUT)
        seconds = round(time.perf_counter() - start, 1)
        self.log.append({"fixture": name, "seconds": seconds, "rc": proc.returncode})
        if proc.returncode != 0:
            raise SystemExit(f"fixture {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")

    def _predict(self, name: str, configs: list[str], root: Path, predict_list: str) -> None:
        self._run(name, lit("predict", *configs, f"--data.init_args.root={root}",
                            f"--data.init_args.predict_list={predict_list}", PREDICT_ARGS,
                            f"--trainer.default_root_dir={self.root / 'runs' / name}",
                            f"--trainer.callbacks.init_args.out_dir={self.path(name)}"))

    def _voc(self, labels, save_labels_json, classes) -> None:
        voc = self.path("voc")
        for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
            (voc / folder).mkdir(parents=True)
        for image_id in ALL_IDS:
            shutil.copyfile(jpg(self.mini, image_id), jpg(voc, image_id))
            shutil.copyfile(mask(self.mini, image_id), mask(voc, image_id))
        for name, ids in (("train", TRAIN_IDS), ("val", VAL_IDS), ("all", ALL_IDS)):
            (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
        save_labels_json({i: labels[i] for i in ALL_IDS}, voc / "cls_labels.json", class_names=classes)

    def _folder(self, labels, voc_classes) -> None:
        """examples/folder_from_voc.py, restricted to 4 classes (masks renumbered to the class list)."""
        from lit_wsss.io import palette_png_bytes

        out = self.path("folder")
        (out / "images").mkdir(parents=True)
        (out / "masks").mkdir()
        rows = []
        for index, image_id in enumerate(ALL_IDS):
            name = f"photo-{image_id}"
            source = self.mini / "JPEGImages" / f"{image_id}.jpg"
            suffix = ".png" if index % 2 else ".jpg"
            if index % 2:
                Image.open(source).convert("RGB").save(out / "images" / f"{name}.png", format="PNG")
            else:
                shutil.copyfile(source, out / "images" / f"{name}.jpg")
            mask = np.array(Image.open(self.mini / "SegmentationClass" / f"{image_id}.png"))
            lookup = np.full(256, 255, np.uint8)
            for voc_value, value in FOLDER_REMAP.items():
                lookup[voc_value] = value
            (out / "masks" / f"{name}.png").write_bytes(palette_png_bytes(lookup[mask]))
            names = [voc_classes[i] for i in np.flatnonzero(labels[image_id])]
            assert set(names) <= set(FOLDER_CLASSES), (image_id, names)
            rows.append((f"{name}{suffix}", ";".join(names)))
        (out / "classes.txt").write_text("\n".join(FOLDER_CLASSES) + "\n")
        with open(out / "labels.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "labels"])
            writer.writerows(rows)
        (out / "train.txt").write_text("".join(f"{n}\n" for n, _ in rows[:4]))
        (out / "val.txt").write_text("".join(f"{n}\n" for n, _ in rows[4:]))
        (out / "all.txt").write_text("".join(f"{n}\n" for n, _ in rows))

    def _voc_big(self, labels, save_labels_json, classes) -> None:
        big = self.path("voc_big")
        (big / "JPEGImages").mkdir(parents=True)
        ids = sorted((self.mini / "val.txt").read_text().split())[:EXPORT_IMAGES]
        for image_id in ids:
            with Image.open(self.mini / "JPEGImages" / f"{image_id}.jpg") as image:
                size = (round(image.width * EXPORT_SCALE), round(image.height * EXPORT_SCALE))
                image.convert("RGB").resize(size, Image.BILINEAR).save(big / "JPEGImages" / f"{image_id}.jpg",
                                                                      quality=90)
        (big / "export.txt").write_text("".join(f"{i}\n" for i in ids))
        save_labels_json({i: labels[i] for i in ids}, big / "cls_labels.json", class_names=classes)

    def _weights(self) -> None:
        import torch
        import torchvision

        folder = self.path("weights")
        folder.mkdir()
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), folder / "good_resnet18.pth")
        good = (folder / "good_resnet18.pth").read_bytes()
        (folder / "empty.pth").write_bytes(b"")
        (folder / "random.pth").write_bytes(random.Random(0).randbytes(64 * 1024))
        (folder / "truncated.pth").write_bytes(good[: len(good) // 2])
        torch.save({"state_dict": Payload()}, folder / "pickled.pth")


class Payload:
    """A custom class pickled into a weights file: ``torch.load(weights_only=True)`` must refuse it (its
    pickle names the global ``__main__.Payload``, which only this script defines)."""

    def __init__(self) -> None:
        self.note = "not a tensor"


# --------------------------------------------------------------------------------------------------- cases


@dataclass
class Ctx:
    """A case's folder and its fresh fixture copies (``ctx.voc`` = case/voc, ...)."""

    case: Path
    fixtures: Fixtures

    def __getattr__(self, name: str) -> Path:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.case / name

    @property
    def out(self) -> Path:
        return self.case / "out"

    def w(self, name: str) -> Path:  # weights files are never modified: read from the fixture folder
        return self.fixtures.path("weights") / name


@dataclass
class Case:
    id: str
    area: str
    broken: str
    argv: Callable[[Ctx], list[Any]] | None
    expect: tuple[str, ...] = ()
    uses: tuple[str, ...] = ()
    setup: Callable[[Ctx], None] | None = None
    teardown: Callable[[Ctx], None] | None = None
    #: paths (relative to the case folder) that must not exist after the run (a failed run's partial results)
    absent: tuple[str, ...] = ()
    #: CAM folders (relative) that must have manifest.json when they hold any .npz
    cam_folders: tuple[str, ...] = ()
    #: IR-label / prediction folders (relative) whose manifest must not say complete: false
    ir_folders: tuple[str, ...] = ()
    #: paths (relative) whose bytes must not change (inputs the command must leave alone)
    unchanged: tuple[str, ...] = ()
    #: extra check after the run: returns {"leftovers": [...], "notes": [...], "wrong": [...]} (all optional)
    check: Callable[[Ctx, dict[str, Any]], dict[str, list[str]]] | None = None
    #: a control or a fault whose right outcome is a success
    expect_ok: bool = False
    #: custom runner (concurrent / killed exports): returns the fields of a plain run
    runner: Callable[[Ctx, Case], dict[str, Any]] | None = None
    #: not in the default run (time budget): run with --extended or name it in --only
    extended: bool = False


def write(path: Path, data: bytes | str) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


def rand_bytes(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def cam_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def run_macro(ctx: Ctx) -> Macro:
    return Macro("RUN", [f"--trainer.default_root_dir={ctx.case / 'run'}", csv_logger(ctx.case / "logs")])


def voc_fit(ctx: Ctx, *extra: Any, root: Path | None = None, fast: bool = True) -> list[Any]:
    return lit("fit", *cfg("voc"), f"--data.init_args.root={root or ctx.voc}",
               "--data.init_args.train_list=train", "--data.init_args.val_list=val", TINY,
               *([FAST] if fast else []), run_macro(ctx), *extra)


def folder_fit(ctx: Ctx, *extra: Any) -> list[Any]:
    return lit("fit", *cfg("folder"), f"--data.init_args.root={ctx.folder}", TINY, FAST, run_macro(ctx),
               *extra)


def eval_cam(ctx: Ctx, *extra: Any, cams: Any = None, root: Any = None, list_name: str = "all") -> list[Any]:
    return lit("eval-cam", "--cams", cams or ctx.cams, "--root", root or ctx.voc, "--list", list_name,
               "--out", ctx.out / "result.json", "--no-progress", *extra)


EVAL_OUT = ("out/result.json", "out/result.md", "out/result.png")


def ir_labels(ctx: Ctx, *extra: Any, cams: Any = None, root: Any = None, out: Any = None) -> list[Any]:
    return lit("ir-labels", "--cams", cams or ctx.cams, "--root", root or ctx.voc, "--list", "train",
               "--out", out or ctx.out / "ir", "--workers", "1", "--no-progress", *extra)


def eval_seg(ctx: Ctx, *extra: Any) -> list[Any]:
    return lit("eval-seg", "--pred", ctx.preds, "--root", ctx.voc, "--list", "val",
               "--out", ctx.out / "seg.json", "--no-progress", *extra)


def voc_predict(ctx: Ctx, out_dir: Path, *extra: Any, root: Path | None = None,
                predict_list: str = "all") -> list[Any]:
    return lit("predict", *cfg("voc", "cam", "stages/predict_cams.yaml"),
               f"--data.init_args.root={root or ctx.voc}", f"--data.init_args.predict_list={predict_list}",
               PREDICT_ARGS, f"--trainer.default_root_dir={ctx.case / 'run'}",
               f"--trainer.callbacks.init_args.out_dir={out_dir}", *extra)


def jpg(ctx_root: Path, image_id: str) -> Path:
    return ctx_root / "JPEGImages" / f"{image_id}.jpg"


def mask(ctx_root: Path, image_id: str) -> Path:
    return ctx_root / "SegmentationClass" / f"{image_id}.png"


def set_label(ctx: Ctx, image_id: str, value: Any) -> None:
    edit_json(ctx.voc / "cls_labels.json", lambda labels: labels.__setitem__(image_id, value))


def drop_label(ctx: Ctx, image_id: str) -> None:
    edit_json(ctx.voc / "cls_labels.json", lambda labels: labels.pop(image_id))


def add_to_list(ctx: Ctx, list_name: str, image_id: str) -> None:
    path = ctx.voc / "ImageSets" / "Segmentation" / f"{list_name}.txt"
    path.write_text(path.read_text() + f"{image_id}\n")


def rewrite_mask(path: Path, change: Callable[[np.ndarray], np.ndarray], mode: str = "P") -> None:
    with Image.open(path) as png:
        palette = png.getpalette()
        values = np.array(png)
    values = change(values)
    image = Image.fromarray(values.astype(np.uint8), mode="L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette(palette)
    elif mode == "RGB":
        colours = np.array(palette, np.uint8).reshape(-1, 3)[values]
        image = Image.fromarray(colours, mode="RGB")
    image.save(path)


def with_value_50(values: np.ndarray) -> np.ndarray:
    values = values.copy()
    values[:16, :16] = 50
    return values


# --- checks -----------------------------------------------------------------------------------------------


def nonfinite_checkpoints(folder: str) -> Callable[[Ctx, dict[str, Any]], dict[str, list[str]]]:
    """Every .ckpt under ``folder``: torch.load(weights_only=True), non-finite tensors of its state dict."""

    def check(ctx: Ctx, result: dict[str, Any]) -> dict[str, list[str]]:
        import torch

        bad, notes, example = [], [], ""
        checkpoints = sorted((ctx.case / folder).rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        for path in checkpoints:
            state = torch.load(path, map_location="cpu", weights_only=True).get("state_dict", {})
            names = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()
                     and not torch.isfinite(v).all()]
            if names:
                bad.append(path.name)
                example = example or f"{len(names)} non-finite tensors in {path.name}, e.g. {names[0]}"
        notes.append(f"{len(checkpoints)} checkpoint(s) saved: {', '.join(p.name for p in checkpoints)}")
        leftovers = ([f"{len(bad)} of {len(checkpoints)} checkpoints hold non-finite weights ({example})"]
                     if bad else [])
        return_value = {"leftovers": leftovers, "notes": notes}
        metrics = sorted((ctx.case / "logs").rglob("metrics.csv"))
        if metrics:
            losses = [row.get("train/loss") or row.get("train/loss_step") or "" for row in
                      csv.DictReader(metrics[0].read_text().splitlines())]
            logged = [x for x in losses if x]
            if logged:
                notes.append("logged train/loss: " + ", ".join(f"{float(x):.3g}" for x in logged[:8]))
        return return_value

    return check


def trained_anyway(ctx: Ctx, result: dict[str, Any]) -> dict[str, list[str]]:
    """Notes on a fit that exited 0: steps done and checkpoints written."""
    notes = []
    checkpoints = sorted(p.name for p in (ctx.case / "run").rglob("*.ckpt"))
    if checkpoints:
        notes.append(f"checkpoints: {checkpoints[:3]}")
    metrics = sorted((ctx.case / "logs").rglob("metrics.csv"))
    if metrics:
        rows = list(csv.DictReader(metrics[0].read_text().splitlines()))
        steps = sorted({r.get("step") for r in rows if r.get("step")})
        notes.append(f"metrics.csv: {len(rows)} rows, steps {steps[:5]}")
    return {"notes": notes}


def eval_result_note(ctx: Ctx, result: dict[str, Any]) -> dict[str, list[str]]:
    path = ctx.out / "result.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    names = data.get("class_names") or []
    notes = [f"result.json: num_classes {data.get('num_classes')}, class names {names[:5]}"
             f"{'...' if len(names) > 5 else ''}"]
    fixed = data.get("fixed") or {}
    if fixed.get("miou") is not None:
        notes.append(f"fixed mIoU {100 * fixed['miou']:.2f} at {fixed.get('threshold')}")
    return {"notes": notes}


def ir_result_note(ctx: Ctx, result: dict[str, Any]) -> dict[str, list[str]]:
    folder = ctx.out / "ir"
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not pngs:
        return {}
    shares = []
    for png in pngs:
        values = np.array(Image.open(png))
        def share(selected: np.ndarray) -> str:
            return f"{100 * float(selected.mean()):.0f}%"

        shares.append(f"{png.stem}: fg {share((values > 0) & (values < 255))} bg {share(values == 0)} "
                      f"unsure {share(values == 255)}")
    return {"notes": [f"{len(pngs)} IR labels written ({'; '.join(shares[:2])})"]}


# --- runners of the export faults ---------------------------------------------------------------------------


def compare_to_reference(folder: Path, reference: Path) -> tuple[list[str], list[str]]:
    """(wrong, notes) of a CAM folder against the clean export of the same list."""
    wrong, notes = [], []
    ref = sorted(p.name for p in reference.glob("*.npz"))
    got = sorted(p.name for p in folder.glob("*.npz")) if folder.is_dir() else []
    if got != ref:
        wrong.append(f"{len(got)} .npz files, the clean export has {len(ref)}")
    differing = [n for n in ref if n in got and (folder / n).read_bytes() != (reference / n).read_bytes()]
    if differing:
        wrong.append(f"{len(differing)} files differ from the clean export (e.g. {differing[0]})")
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        wrong.append("no manifest.json")
    else:
        data = json.loads(manifest.read_text())
        if data.get("count") != len(ref):
            wrong.append(f"manifest count {data.get('count')} != {len(ref)}")
        notes.append(f"manifest: count {data.get('count')}, written_this_run {data.get('written_this_run')}")
    if not wrong:
        notes.append(f"all {len(ref)} files byte-identical to the clean export")
    return wrong, notes


def wait_for_npz(folder: Path, process: subprocess.Popen, count: int = 1, limit: float = TIMEOUT) -> float:
    start = time.monotonic()
    while time.monotonic() - start < limit and process.poll() is None:
        if folder.is_dir() and len(list(folder.glob("*.npz"))) >= count:
            break
        time.sleep(0.02)
    return time.monotonic() - start


def popen(argv: list[Any], ctx: Ctx, name: str) -> tuple[subprocess.Popen, Path, Path]:
    stdout, stderr = ctx.case / f"{name}.stdout", ctx.case / f"{name}.stderr"
    with open(stdout, "w") as out, open(stderr, "w") as err:  # the child keeps its own copies
        process = subprocess.Popen(flatten(argv), cwd=ctx.case, env=run_env(), stdout=out, stderr=err,
                                   start_new_session=True)
    return process, stdout, stderr


def finish(process: subprocess.Popen) -> int:
    try:
        return process.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return -9


def run_concurrent(ctx: Ctx, case: Case) -> dict[str, Any]:
    """Export A starts; when its first .npz appears, export B starts into the same folder; both run to their
    end. Right outcomes: B refused clearly, or both succeed with the clean export's bytes."""
    out = ctx.out / "cams"
    argv = voc_predict(ctx, out, root=ctx.fixtures.path("voc_big"), predict_list="export")
    t0 = time.monotonic()
    a, _, a_err = popen(argv, ctx, "A")
    wait_for_npz(out, a)
    b_start, files_at_b = time.monotonic() - t0, len(list(out.glob("*.npz")))
    b, _, b_err = popen(argv, ctx, "B")
    ends: dict[str, tuple[float, int]] = {}
    while len(ends) < 2 and time.monotonic() - t0 < TIMEOUT:
        for name, process in (("A", a), ("B", b)):
            if name not in ends and process.poll() is not None:
                ends[name] = (time.monotonic() - t0, len(list(out.glob("*.npz"))))
        time.sleep(0.05)
    rc_a, rc_b = finish(a), finish(b)
    wrong, notes = compare_to_reference(out, ctx.fixtures.path("export_ref"))
    stderr_a, stderr_b = a_err.read_text(), b_err.read_text()
    ended = ", ".join(f"{name} ended at {t:.1f} s ({n} files)"
                      for name, (t, n) in sorted(ends.items(), key=lambda e: e[1]))
    timeline = f"B started at {b_start:.1f} s with {files_at_b} of {EXPORT_IMAGES} files written; {ended}"
    notes.insert(0, timeline)
    # the message the user sees: the failing run's (B first: the one started second)
    failing = [(name, rc, err) for name, rc, err in (("B", rc_b, stderr_b), ("A", rc_a, stderr_a)) if rc != 0]
    if failing:
        name, rc, stderr = failing[0]
        notes.append(f"message of run {name}")
    else:
        rc, stderr = 0, stderr_b
    return {"rc": rc, "rc_display": f"A {rc_a}, B {rc_b}", "stderr": stderr,
            "stderr_all": {"A": stderr_a[-6000:], "B": stderr_b[-6000:]}, "argv": flatten(argv),
            "display": render(argv, ctx.case.parents[1]), "wrong": wrong, "notes": notes}


def run_killed(ctx: Ctx, case: Case) -> dict[str, Any]:
    """Export killed (SIGKILL) after its 3rd file, rerun to the end; compared with the clean export."""
    out = ctx.out / "cams"
    argv = voc_predict(ctx, out, root=ctx.fixtures.path("voc_big"), predict_list="export")
    first, _, first_err = popen(argv, ctx, "killed")
    wait_for_npz(out, first, count=3)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    partial = len(list(out.glob("*.npz"))) if out.is_dir() else 0
    tmp = [p.name for p in out.glob("*.tmp")] if out.is_dir() else []
    manifest = "present" if (out / "manifest.json").exists() else "absent"
    notes = [f"killed with {partial} of {EXPORT_IMAGES} files written, {len(tmp)} temporary file(s), "
             f"manifest.json {manifest}"]
    start = time.perf_counter()
    proc = subprocess.run(flatten(argv), cwd=ctx.case, env=run_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    notes.append(f"rerun exit {proc.returncode} in {time.perf_counter() - start:.0f} s")
    wrong, more = compare_to_reference(out, ctx.fixtures.path("export_ref"))
    return {"rc": proc.returncode, "rc_display": f"kill -9, rerun {proc.returncode}", "stderr": proc.stderr,
            "argv": flatten(argv), "display": render(argv, ctx.case.parents[1]), "wrong": wrong,
            "notes": notes + more}


# --- the catalogue ----------------------------------------------------------------------------------------


def shrink(path: Path, size: tuple[int, int]) -> None:
    with Image.open(path) as png:
        small = png.resize(size, Image.NEAREST)
    small.save(path)


def half_of(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


def without(arrays: dict[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    return {key: value for key, value in arrays.items() if key != name}


def all_nan(path: Path) -> dict[str, np.ndarray]:
    arrays = cam_arrays(path)
    return {**arrays, "high_res": np.full_like(arrays["high_res"], np.nan)}


def replace_text(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new, 1))


#: extended cases: more variants of checks the default run already makes (run them with --extended or --only)
EXTENDED = {
    "data-eval-cam-missing-list", "data-no-image-folder", "labels-index-out-of-range",
    "labels-csv-bad-header", "masks-no-folder", "masks-eval-seg-prediction-value-50", "cams-no-folder",
    "cams-wrong-size",
    "cams-bad-manifest", "cams-random-bytes-ir-labels", "cams-explicit-convention-without-bg",
    "thresholds-eval-cam-zero-step", "thresholds-ir-cpn-no-thresholds", "export-out-dir-is-a-file",
    "config-unknown-subcommand", "config-wrong-type", "config-missing-file",
}


def cases() -> list[Case]:
    c: list[Case] = []
    add = c.append
    a, b = TRAIN_IDS[0], TRAIN_IDS[1]  # 2007_000032, 2007_000042: broken train images / labels
    v = VAL_IDS[0]  # 2007_003848: broken val mask / CAM

    # controls: the fixtures and the tiny commands work when nothing is broken
    add(Case("control-fit", "control", "nothing broken: tiny fit (fast_dev_run) on the VOC fixture",
             lambda x: voc_fit(x), uses=("voc",), expect_ok=True, check=trained_anyway))
    add(Case("control-eval-cam", "control",
             "nothing broken: eval-cam of the folder set's CAMs, --num-classes 4",
             lambda x: eval_cam(x, "--num-classes", "4", cams=x.folder_cams, root=x.folder),
             uses=("folder", "folder_cams"), expect_ok=True, check=eval_result_note))

    # data
    add(Case("data-missing-root", "data", "data.root points to a folder that does not exist",
             lambda x: voc_fit(x, root=x.case / "nope"), expect=("nope",)))
    add(Case("data-missing-split-list", "data", "train_list names a list that does not exist",
             lambda x: voc_fit(x, "--data.init_args.train_list=nope"), uses=("voc",), expect=("nope",)))
    add(Case("data-empty-split-list", "data", "the train list is an empty file",
             lambda x: voc_fit(x), uses=("voc",), expect=("train.txt",),
             setup=lambda x: write(x.voc / "ImageSets/Segmentation/train.txt", "")))
    add(Case("data-list-id-no-image", "data", "train list has an id (with a label) but no image",
             lambda x: voc_fit(x), uses=("voc",), expect=("2099_000001",),
             setup=lambda x: (add_to_list(x, "train", "2099_000001"),
                              set_label(x, "2099_000001", ["person"]))))
    add(Case("data-list-id-no-label", "data", "train list has an id (with an image) not in cls_labels.json",
             lambda x: voc_fit(x), uses=("voc",), expect=(a,), setup=lambda x: drop_label(x, a)))
    add(Case("data-eval-cam-missing-list", "data", "eval-cam --list names a list that does not exist",
             lambda x: eval_cam(x, list_name="nope"), uses=("voc", "cams"), expect=("nope",),
             absent=EVAL_OUT))
    add(Case("data-no-image-folder", "data", "JPEGImages/ renamed: ir-labels finds no image folder",
             lambda x: ir_labels(x), uses=("voc", "cams"), expect=("JPEGImages", "image folder"),
             setup=lambda x: (x.voc / "JPEGImages").rename(x.voc / "photos"), ir_folders=("out/ir",)))

    # labels
    add(Case("labels-unknown-class-csv", "labels", "labels.csv names the class 'cloud' (not in classes.txt)",
             lambda x: folder_fit(x), uses=("folder",), expect=("cloud",),
             setup=lambda x: replace_text(x.folder / "labels.csv", "aeroplane;person", "aeroplane;cloud")))
    add(Case("labels-unknown-class-json", "labels", "cls_labels.json gives an image the class 'unicorn'",
             lambda x: voc_fit(x), uses=("voc",), expect=("unicorn",),
             setup=lambda x: set_label(x, a, ["aeroplane", "unicorn"])))
    add(Case("labels-malformed-json", "labels", "cls_labels.json cut in the middle (invalid JSON)",
             lambda x: voc_fit(x), uses=("voc",), expect=("cls_labels.json",),
             setup=lambda x: write(x.voc / "cls_labels.json", (x.voc / "cls_labels.json").read_bytes()[:40])))
    add(Case("labels-index-out-of-range", "labels", "cls_labels.json gives an image the class index 25 "
             "(20 classes)", lambda x: voc_fit(x), uses=("voc",), expect=("25",),
             setup=lambda x: set_label(x, a, [25])))
    add(Case("labels-csv-bad-header", "labels", "labels.csv header 'file,classes' instead of 'image,labels'",
             lambda x: folder_fit(x), uses=("folder",), expect=("labels.csv",),
             setup=lambda x: replace_text(x.folder / "labels.csv", "image,labels", "file,classes")))
    add(Case("labels-empty-vector", "labels", f"training image {b} has the empty label list [] (no object)",
             lambda x: voc_fit(x), uses=("voc",), expect=(b,), setup=lambda x: set_label(x, b, []),
             check=trained_anyway))
    add(Case("labels-prepare-random-npy", "labels", "prepare labels --from a .npy of random bytes",
             lambda x: lit("prepare", "labels", "--from", x.case / "cls_labels.npy",
                           "--out", x.out / "labels.json"),
             expect=("cls_labels.npy",), absent=("out/labels.json",),
             setup=lambda x: write(x.case / "cls_labels.npy", rand_bytes(4096))))

    # masks (ground truth read by eval-cam, eval-seg and the validation loop)
    add(Case("masks-missing", "masks", f"SegmentationClass/{v}.png deleted",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=(f"{v}.png",), absent=EVAL_OUT,
             setup=lambda x: mask(x.voc, v).unlink()))
    add(Case("masks-wrong-size", "masks", f"{v}.png resized to 100 x 50",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=(f"{v}.png",), absent=EVAL_OUT,
             setup=lambda x: shrink(mask(x.voc, v), (100, 50))))
    add(Case("masks-rgb", "masks", f"{v}.png saved as an RGB PNG (VOC colours) instead of a palette PNG",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=(f"{v}.png",), absent=EVAL_OUT,
             setup=lambda x: rewrite_mask(mask(x.voc, v), lambda m: m, mode="RGB")))
    add(Case("masks-value-50", "masks", f"{v}.png has pixels of value 50 (classes are 0..20, 255)",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=(f"{v}.png",), absent=EVAL_OUT,
             setup=lambda x: rewrite_mask(mask(x.voc, v), with_value_50)))
    add(Case("masks-value-50-validation", "masks", f"val mask {v}.png has value 50: fit's validation loop",
             lambda x: voc_fit(x), uses=("voc",), expect=(f"{v}.png",),
             setup=lambda x: rewrite_mask(mask(x.voc, v), with_value_50)))
    add(Case("masks-no-folder", "masks", "SegmentationClass/ removed (no ground-truth folder at all)",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=("SegmentationClass",), absent=EVAL_OUT,
             setup=lambda x: shutil.rmtree(x.voc / "SegmentationClass")))
    add(Case("masks-eval-seg-missing-prediction", "masks", f"eval-seg: the prediction {v}.png is missing",
             lambda x: eval_seg(x), uses=("voc", "preds"), expect=(f"{v}.png",),
             absent=("out/seg.json", "out/seg.md"), setup=lambda x: (x.preds / f"{v}.png").unlink()))
    add(Case("masks-eval-seg-prediction-value-50", "masks", f"eval-seg: prediction {v}.png holds value 50",
             lambda x: eval_seg(x), uses=("voc", "preds"), expect=(f"{v}.png",),
             absent=("out/seg.json", "out/seg.md"),
             setup=lambda x: rewrite_mask(x.preds / f"{v}.png", with_value_50)))

    # images
    add(Case("images-corrupt-jpeg", "images", f"training image {a}.jpg replaced by 20 kB of random bytes",
             lambda x: voc_fit(x), uses=("voc",), expect=(f"{a}.jpg",),
             setup=lambda x: write(jpg(x.voc, a), rand_bytes(20000))))
    add(Case("images-truncated-jpeg", "images", f"training image {a}.jpg cut to its first half",
             lambda x: voc_fit(x), uses=("voc",), expect=(f"{a}.jpg",), check=trained_anyway,
             setup=lambda x: write(jpg(x.voc, a), half_of(jpg(x.voc, a)))))
    add(Case("images-zero-byte-jpeg", "images", f"training image {a}.jpg is an empty file",
             lambda x: voc_fit(x), uses=("voc",), expect=(f"{a}.jpg",),
             setup=lambda x: write(jpg(x.voc, a), b"")))
    add(Case("images-truncated-jpeg-ir-labels", "images", f"ir-labels: image {a}.jpg cut to its first half",
             lambda x: ir_labels(x), uses=("voc", "cams"), expect=(f"{a}.jpg",), ir_folders=("out/ir",),
             check=ir_result_note, setup=lambda x: write(jpg(x.voc, a), half_of(jpg(x.voc, a)))))
    add(Case("images-corrupt-jpeg-predict", "images",
             f"predict: the 5th image of the list ({v}.jpg) is random bytes",
             lambda x: voc_predict(x, x.out / "cams"), uses=("voc",), expect=(f"{v}.jpg",),
             cam_folders=("out/cams",), setup=lambda x: write(jpg(x.voc, v), rand_bytes(20000))))

    # CAMs
    add(Case("cams-random-bytes", "CAMs", f"CAM file {a}.npz replaced by random bytes",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=(f"{a}.npz",), absent=EVAL_OUT,
             setup=lambda x: write(x.cams / f"{a}.npz", rand_bytes(5000))))
    add(Case("cams-missing-keys", "CAMs", f"CAM file {a}.npz rewritten without the 'keys' array",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=(f"{a}.npz",), absent=EVAL_OUT,
             setup=lambda x: save_npz(x.cams / f"{a}.npz", **without(cam_arrays(x.cams / f"{a}.npz"),
                                                                     "keys"))))
    add(Case("cams-missing-id", "CAMs", f"CAM file {v}.npz deleted (id still listed)",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=(f"{v}",), absent=EVAL_OUT,
             setup=lambda x: (x.cams / f"{v}.npz").unlink()))
    add(Case("cams-no-folder", "CAMs", "eval-cam --cams names a folder that does not exist",
             lambda x: eval_cam(x, cams=x.case / "nope"), uses=("voc",), expect=("nope",), absent=EVAL_OUT))
    add(Case("cams-nan", "CAMs", f"CAM file {a}.npz: high_res all NaN",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=(f"{a}.npz",), absent=EVAL_OUT,
             check=eval_result_note,
             setup=lambda x: save_npz(x.cams / f"{a}.npz", **all_nan(x.cams / f"{a}.npz"))))
    add(Case("cams-wrong-size", "CAMs", f"CAM file {a}.npz replaced by {v}.npz (another image's size)",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=(f"{a}",), absent=EVAL_OUT,
             setup=lambda x: shutil.copyfile(x.cams / f"{v}.npz", x.cams / f"{a}.npz")))
    add(Case("cams-bad-manifest", "CAMs", "the CAM folder's manifest.json is not JSON",
             lambda x: eval_cam(x), uses=("voc", "cams"), expect=("manifest.json",), absent=EVAL_OUT,
             setup=lambda x: write(x.cams / "manifest.json", "{not json")))
    add(Case("cams-num-classes-20-on-4-class", "CAMs",
             "eval-cam --num-classes 20 on the CAMs of a 4-class folder data set (the manifest says 4)",
             lambda x: eval_cam(x, "--num-classes", "20", cams=x.folder_cams, root=x.folder),
             uses=("folder", "folder_cams"), expect=("num-classes", "num_classes", "4 classes"),
             absent=EVAL_OUT, check=eval_result_note))
    add(Case("cams-random-bytes-ir-labels", "CAMs", f"ir-labels: CAM file {a}.npz is random bytes",
             lambda x: ir_labels(x), uses=("voc", "cams"), expect=(f"{a}.npz",), ir_folders=("out/ir",),
             setup=lambda x: write(x.cams / f"{a}.npz", rand_bytes(5000))))
    add(Case("cams-explicit-convention-without-bg", "CAMs",
             "ir-labels --convention explicit on CAMs without a 'bg' map",
             lambda x: ir_labels(x, "--convention", "explicit"), uses=("voc", "cams"), expect=("bg",),
             ir_folders=("out/ir",)))

    # thresholds
    for tid, text, expect in (("abc", "abc", "abc"), ("reversed", "0.5:0.1:0.1", "0.5:0.1:0.1"),
                              ("empty", "", "thresholds"), ("zero-step", "0:0.6:0", "0:0.6:0"),
                              ("nan", "0.1,nan", "nan")):
        add(Case(f"thresholds-eval-cam-{tid}", "thresholds", f"eval-cam --thresholds {text!r}",
                 lambda x, text=text: eval_cam(x, "--thresholds", text), uses=("voc", "cams"),
                 expect=(expect,), absent=EVAL_OUT))
    add(Case("thresholds-eval-cam-fixed-nan", "thresholds", "eval-cam --fixed-threshold nan",
             lambda x: eval_cam(x, "--fixed-threshold", "nan"), uses=("voc", "cams"),
             expect=("fixed-threshold", "fixed_threshold", "fixed threshold"), absent=EVAL_OUT,
             check=eval_result_note))
    add(Case("thresholds-ir-fg-below-bg", "thresholds", "ir-labels --fg 0.05 --bg 0.30 (fg below bg)",
             lambda x: ir_labels(x, "--fg", "0.05", "--bg", "0.30"), uses=("voc", "cams"), expect=("0.05",),
             ir_folders=("out/ir",), absent=("out/ir",), check=ir_result_note))
    add(Case("thresholds-ir-other-parameters", "thresholds",
             "ir-labels --fg 0.5 into a folder made with the default thresholds (same CAMs)",
             lambda x: ir_labels(x, "--fg", "0.5", cams=x.fixtures.path("cams"), out=x.ir),
             uses=("voc", "ir"), expect=("fg_threshold", "parameters"), ir_folders=("ir",),
             unchanged=("ir",)))
    add(Case("thresholds-ir-cpn-no-thresholds", "thresholds", "ir-labels --convention cpn without --fg/--bg",
             lambda x: ir_labels(x, "--convention", "cpn"), uses=("voc", "cams"), expect=("cpn",),
             absent=("out/ir",)))

    # weights: pretrained (the backbone's) and init_weights (the whole model's)
    bad_weights = (("missing", "/nope.pth", "a path that does not exist"),
                   ("empty", "empty.pth", "an empty file"),
                   ("random", "random.pth", "64 kB of random bytes"),
                   ("truncated", "truncated.pth", "the first half of a good torch.save zip"),
                   ("pickled", "pickled.pth", "torch.save of a dict holding a custom class instance"))
    for option in ("pretrained", "init_weights"):
        for wid, name, how in bad_weights:
            add(Case(f"weights-{option.replace('_', '-')}-{wid}", "weights", f"{option}= {how}",
                     lambda x, option=option, name=name: voc_fit(
                         x, f"--model.init_args.{option}={name if name.startswith('/') else x.w(name)}"),
                     uses=("voc",), expect=(Path(name).name,)))
    add(Case("weights-pretrained-good", "control", "pretrained= a torchvision resnet18 state dict (good)",
             lambda x: voc_fit(x, f"--model.init_args.pretrained={x.w('good_resnet18.pth')}"), uses=("voc",),
             expect_ok=True, check=trained_anyway))
    add(Case("weights-init-backbone-only", "weights",
             "init_weights= a torchvision resnet18 state dict (a backbone, not a CAM model)",
             lambda x: voc_fit(x, f"--model.init_args.init_weights={x.w('good_resnet18.pth')}"),
             uses=("voc",), expect=("good_resnet18.pth",)))
    add(Case("weights-ckpt-path-random", "weights", "predict --ckpt_path= a file of random bytes",
             lambda x: voc_predict(x, x.out / "cams", f"--ckpt_path={x.w('random.pth')}"), uses=("voc",),
             expect=("random.pth",), cam_folders=("out/cams",)))

    # training
    add(Case("training-nan-loss", "training", "lr 1e30: the loss turns NaN (6 steps, checkpoint every step)",
             lambda x: voc_fit(x, "--model.init_args.lr=1e30", "--trainer.limit_val_batches=0",
                               "--trainer.max_steps=6", "--trainer.log_every_n_steps=1",
                               checkpoint_every_step(x.case / "ckpts"), fast=False),
             uses=("voc",), expect=("nan", "finite"), check=nonfinite_checkpoints("ckpts")))
    add(Case("training-batch-larger-than-list", "training",
             "batch_size 8 on a 4-image train list (drop_last: no batch)",
             lambda x: voc_fit(x, "--data.init_args.batch_size=8", "--trainer.max_steps=2",
                               "--trainer.limit_val_batches=0", fast=False),
             uses=("voc",), expect=("batch_size", "batch size"), check=trained_anyway))

    # export (lit-wsss predict + CAMWriter)
    add(Case("export-concurrent", "export", "two CAM exports into one folder: B starts when A's first .npz "
             f"appears ({EXPORT_IMAGES} images)", None, runner=run_concurrent, cam_folders=("out/cams",),
             expect=("another", "lock", "running", "in use", "busy", "concurrent"), expect_ok=True))
    add(Case("export-sigkill-rerun", "export", f"CAM export SIGKILLed after its 3rd file ({EXPORT_IMAGES} "
             "images), then rerun", None, runner=run_killed, expect_ok=True, cam_folders=("out/cams",)))
    add(Case("export-another-producer", "export",
             "predict with cam_scales [1.0, 0.5] into the CAM folder of a [1.0] export",
             lambda x: voc_predict(x, x.cams, "--model.init_args.cam_scales=[1.0,0.5]"),
             uses=("voc", "cams"), expect=("another producer", "run.json"), unchanged=("cams",)))
    add(Case("export-out-dir-is-a-file", "export", "predict out_dir is an existing file",
             lambda x: voc_predict(x, x.case / "cams_file"), uses=("voc",), expect=("cams_file",),
             setup=lambda x: write(x.case / "cams_file", "not a folder"), unchanged=("cams_file",)))

    # config
    add(Case("config-unknown-key", "config", "--model.init_args.no_such_option 1",
             lambda x: voc_fit(x, "--model.init_args.no_such_option", "1"), uses=("voc",),
             expect=("no_such_option",)))
    add(Case("config-not-yaml", "config", "--config bad.yaml holding text that is not YAML",
             lambda x: voc_fit(x, "--config", x.case / "bad.yaml"), uses=("voc",), expect=("bad.yaml",),
             setup=lambda x: write(x.case / "bad.yaml", "model: [unclosed\n  init_args: {: :\n\t- x")))
    add(Case("config-missing-file", "config", "--config names a file that does not exist",
             lambda x: voc_fit(x, "--config", x.case / "nope.yaml"), uses=("voc",), expect=("nope.yaml",)))
    add(Case("config-wrong-type", "config", "--trainer.max_steps abc",
             lambda x: voc_fit(x, "--trainer.max_steps", "abc"), uses=("voc",), expect=("max_steps",)))
    add(Case("config-unknown-subcommand", "config", "lit-wsss nope", lambda x: lit("nope"), expect=("nope",)))
    add(Case("config-pipeline-unknown-method", "config",
             "lit-wsss pipeline --method nope (make pipeline METHOD=nope)",
             lambda x: lit("pipeline", "--method", "nope", "--root", x.voc, "--list", "train",
                           "--out", x.out / "pipe"),
             uses=("voc",), expect=("nope",), absent=("out/pipe",)))
    add(Case("config-pipeline-unknown-data", "config", 
             "lit-wsss pipeline --data nope (make pipeline DATA=nope)",
             lambda x: lit("pipeline", "--data", "nope", "--root", x.voc, "--list", "train",
                           "--out", x.out / "pipe"),
             uses=("voc",), expect=("nope",), absent=("out/pipe",)))
    for case in c:
        case.extended = case.extended or case.id in EXTENDED
    assert not EXTENDED - {case.id for case in c}, EXTENDED - {case.id for case in c}
    assert len({case.id for case in c}) == len(c), "repeated case id"
    return c


# --------------------------------------------------------------------------------------------------- running


def snapshot(path: Path) -> str | None:
    """A digest of a file or folder (names and bytes), None when it does not exist."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def tmp_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*.tmp")}


def split_stderr(stderr: str) -> tuple[list[str], bool]:
    """(the stderr lines without traceback frame lines, whether a traceback appeared)."""
    kept, in_frames, traceback = [], False, False
    for line in stderr.splitlines():
        if line.startswith("Traceback (most recent call last)"):
            in_frames = traceback = True
            continue
        if in_frames:
            if not line.strip() or line[:1].isspace():
                continue
            in_frames = False  # the exception line
        kept.append(line)
    return kept, traceback


def read_message(stderr: str) -> dict[str, Any]:
    """The first error line (and the indented lines that continue it, as argparse / jsonargparse print them),
    the last line, the final exception line, and every error block (for "named anywhere")."""
    lines, traceback = split_stderr(stderr)
    lines = [line.rstrip() for line in lines if line.strip()]
    blocks = []
    for index, line in enumerate(lines):
        if "error" in line.lower() or _exception_line(line):
            block = [line.strip()]
            for follow in lines[index + 1: index + 11]:
                if not follow[:1].isspace():
                    break
                block.append(follow.strip())
            blocks.append((line, " / ".join(block)))
    first = next(((line, block) for line, block in blocks if "error" in line.lower()), None)
    last = lines[-1] if lines else ""
    exceptions = [line for line in lines if _exception_line(line)]
    return {"first_error_line": first[0] if first else None, "message": first[1] if first else last,
            "last_line": last, "final_exception": exceptions[-1] if exceptions else None,
            "traceback": traceback,
            "error_text": "\n".join(block for _, block in blocks)}


def _exception_line(line: str) -> bool:
    """``ValueError: ...``, ``zipfile.BadZipFile: ...``: a traceback's exception line."""
    head, colon, _ = line.partition(":")
    name = head.rsplit(".", 1)[-1]
    return bool(colon) and head[:1].isalpha() and " " not in head and (
        name.endswith(("Error", "Exception", "Exit", "Interrupt")) or name in ("BadZipFile", "KeyError"))


def run_case(case: Case, work: Path, fixtures: Fixtures) -> dict[str, Any]:
    folder = work / "cases" / case.id
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    ctx = Ctx(folder, fixtures)
    for name in case.uses:
        shutil.copytree(fixtures.path(name), folder / name)
    (folder / "out").mkdir()
    if case.setup:
        case.setup(ctx)
    before_tmp = tmp_files(folder)
    before = {p: snapshot(folder / p) for p in case.unchanged}
    start = time.perf_counter()
    if case.runner is not None:
        run = case.runner(ctx, case)
    else:
        argv_items = case.argv(ctx)
        argv = flatten(argv_items)
        try:
            proc = subprocess.run(argv, cwd=folder, env=run_env(), capture_output=True, text=True,
                                  timeout=TIMEOUT)
            run = {"rc": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout}
        except subprocess.TimeoutExpired as expired:
            run = {"rc": "timeout", "stderr": (expired.stderr or b"").decode(errors="replace")
                   if isinstance(expired.stderr, bytes) else (expired.stderr or ""), "stdout": ""}
        run["argv"] = argv
        run["display"] = render(argv_items, work)
    seconds = time.perf_counter() - start
    if "display" not in run:
        run["display"] = render(run["argv"], work)
    message = read_message(run["stderr"])
    leftovers = [f"{p} (temporary file)" for p in sorted(tmp_files(folder) - before_tmp)]
    rc = run["rc"]
    failed = rc != 0
    if failed:
        for rel in case.absent:
            path = folder / rel
            if path.is_file() or (path.is_dir() and any(path.iterdir())):
                leftovers.append(f"{rel} exists")
    for rel in case.cam_folders:
        path = folder / rel
        npz = list(path.glob("*.npz")) if path.is_dir() else []
        if npz and not (path / "manifest.json").is_file():
            leftovers.append(f"{rel}: {len(npz)} .npz, no manifest.json")
    for rel in case.ir_folders:
        manifest = folder / rel / "manifest.json"
        if manifest.is_file():
            try:
                complete = json.loads(manifest.read_text()).get("complete")
            except ValueError:
                complete = "unreadable"
            if complete is not True:
                pngs = len(list((folder / rel).glob("*.png")))
                leftovers.append(f"{rel}: manifest complete={complete}, {pngs} PNG(s)")
    for rel, digest in before.items():
        if snapshot(folder / rel) != digest:
            leftovers.append(f"{rel} modified")
    notes: list[str] = list(run.get("notes", []))
    wrong: list[str] = list(run.get("wrong", []))
    if case.check is not None:
        extra = case.check(ctx, run)
        leftovers += extra.get("leftovers", [])
        notes += extra.get("notes", [])
        wrong += extra.get("wrong", [])
    if case.teardown:
        case.teardown(ctx)
    # matched with the work folder's paths shortened: a case folder's name must not name the thing itself
    def names(text: str | None) -> bool:
        text = shorten(text or "", work, case.id).lower()
        return any(expected.lower() in text for expected in case.expect)

    first = message["message"] or ""
    named, named_first_line = names(first), names(message["first_error_line"])
    named_anywhere = names(message["error_text"])
    # exit 0: does any stderr line (a warning) name the broken thing?
    warning = None
    if rc == 0:
        warning = next((line for line in split_stderr(run["stderr"])[0] if names(line)), None)
    if warning is not None and not case.expect_ok:
        first = warning.strip()
    verdict = judge(case, rc, named, named_anywhere, message["traceback"], leftovers, wrong, warning)
    return {
        "id": case.id, "area": case.area, "broken": case.broken, "argv": run["argv"],
        "command": run["display"],
        "exit": rc, "exit_display": run.get("rc_display", str(rc)), "seconds": round(seconds, 1),
        "first_error_line": message["first_error_line"], "message": first, "last_line": message["last_line"],
        "final_exception": message["final_exception"], "traceback": message["traceback"],
        "expect": list(case.expect), "named": named, "named_first_line": named_first_line, "warning": warning,
        "named_anywhere": named_anywhere, "leftovers": leftovers,
        "wrong": wrong, "notes": notes, "verdict": verdict, "expect_ok": case.expect_ok,
        "stderr_tail": run["stderr"].splitlines()[-40:], "stderr_all": run.get("stderr_all"),
        "case_dir": str(folder),
    }


def judge(case: Case, rc: Any, named: bool, named_anywhere: bool, traceback: bool, leftovers: list[str],
          wrong: list[str], warning: str | None = None) -> str:
    if rc == 0:
        if case.expect_ok:
            if wrong:
                return "silent"
            return "leftover" if leftovers else "ok"
        return "warned" if warning is not None else "silent"
    if case.expect_ok and not case.expect:
        return "leftover" if leftovers else ("traceback" if traceback else "unclear")
    if leftovers:
        return "leftover"
    if traceback:
        return "traceback" if named_anywhere else "unclear"
    return "clear" if named else "unclear"


# --------------------------------------------------------------------------------------------------- report


SITE_PACKAGES = str(Path(np.__file__).resolve().parents[1])


def shorten(text: str, work: Path, case_id: str | None = None) -> str:
    if case_id is not None:
        text = text.replace(str(work / "cases" / case_id), "$C").replace(f"$CASES/{case_id}", "$C")
    text = text.replace(str(work / "cases") + "/", "$CASES/").replace(str(work / "fixtures") + "/", "$FIX/")
    text = text.replace(SITE_PACKAGES + "/", "site-packages/")
    text = text.replace(str(work), "$WORK").replace(str(REPO) + "/", "")
    text = text.replace(sys.executable, "python")
    return text


def render(argv_items: list[Any], work: Path) -> str:
    parts: list[str] = []
    items = list(argv_items)
    if items[:3] == [sys.executable, "-m", "lit_wsss"]:
        parts.append("lit-wsss")
        items = items[3:]
    for item in items:
        if isinstance(item, Macro):
            parts.append(f"${item.name}")
        else:
            text = str(item)
            quote = (not text or " " in text) and not text.startswith("--trainer.")
            parts.append(repr(text) if quote else text)
    return shorten(" ".join(parts), work).replace("--config experiments/", "-c ")


def cell(text: Any, limit: int = 220) -> str:
    text = "" if text is None else str(text)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any], work: Path) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    lines = [
        "# Bad inputs and faults: what the user sees",
        "",
        f"`{meta['command']}` on {meta['host']}; lit_wsss checkout `{meta['repo']}` "
        f"(commit {meta['commit']}); {len(results)} cases in {meta['seconds']:.0f} s "
        f"(fixtures {meta['fixture_seconds']:.0f} s).",
        "",
        "Verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ". "
        "clear = non-zero exit, the message names the broken thing, nothing left behind; "
        "traceback = named only after / in a Python traceback; "
        "silent = exit 0 on a bad input (or wrong files); warned = exit 0, but a warning names it; "
        "unclear = non-zero exit without naming it; "
        "leftover = temporary or partial outputs remain; "
        "ok = a control (or a fault whose right outcome is success) that succeeded with correct output.",
        "",
        "Commands: `-c X` is `--config experiments/X`; "
        f"`$TINY` = `{' '.join(TINY.args)}`; `$PRED` = `{' '.join(PREDICT_ARGS.args)}`; "
        "`$RUN` = `--trainer.default_root_dir=$C/run` + a CSV logger under `$C/logs`; `$CKPT_EVERY_STEP` = "
        "`--trainer.callbacks=[ModelCheckpoint(dirpath=$C/ckpts, every_n_train_steps=1, save_top_k=-1)]`; "
        "`$C/` is the case's own folder (`$CASES/<id>/`), holding its fresh copies of the fixtures "
        "(`voc/`, `cams/`, ...); `$FIX/` holds the fixtures that no case modifies.",
        "",
        "Message: the first stderr line containing \"error\" (traceback frame lines skipped) with the "
        "indented lines that continue it (argparse / jsonargparse name the offending key there), else the "
        "last stderr line; after a traceback, `⟶ last:` gives its final exception line. "
        "Names it: `yes` = the message contains the expected text (shown), `later` = only a later error / "
        "exception line does, "
        "`no` = none does.",
        "",
        "| id | area | broken input | command | exit | traceback | message | "
        "names it | leftovers / notes | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cid = r["id"]
        message = shorten(r["message"] or "", work, cid)
        if r["traceback"] and r["final_exception"] and not r["final_exception"].startswith(r["message"]):
            message = cell(message, 240) + " ⟶ last: " + shorten(r["final_exception"], work, cid)
        extra = [*("LEFTOVER " + x for x in r["leftovers"]), *("WRONG " + x for x in r["wrong"]), *r["notes"]]
        named = "-" if not r["expect"] or r["verdict"] == "ok" else (
            ("yes" if r["named"] else ("later" if r["named_anywhere"] else "no")) + f" (`{r['expect'][0]}`)")
        lines.append("| " + " | ".join([
            f"`{cid}`", r["area"], cell(r["broken"], 160), f"`{cell(shorten(r['command'], work, cid), 400)}`",
            cell(r["exit_display"]), "yes" if r["traceback"] else "no", cell(message, 400), named,
            cell(shorten("; ".join(extra), work, cid), 360), f"**{r['verdict']}**",
        ]) + " |")
    lines.append("")
    return "\n".join(lines)


def git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def select(all_cases: list[Case], only: str | None, extended: bool = False) -> list[Case]:
    if not only:
        return [c for c in all_cases if extended or not c.extended]
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    return [c for c in all_cases
            if any(fnmatch.fnmatch(c.id, p) or p.lower() == c.area.lower() for p in patterns)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None,
                        help="markdown table to write (the raw results go to .json beside it)")
    parser.add_argument("--work", default=None,
                        help="fixtures and case folders (default: a new temporary folder, removed at the "
                             "end); fixtures already built there by the same checkout are reused")
    parser.add_argument("--shared-data", default=str(REPO.parent / "shared" / "data"),
                        help="the shared data folder with voc12-mini/ and voc12/cls_labels.npy "
                             "(default ../shared/data relative to the repository)")
    parser.add_argument("--only", default=None,
                        help="comma-separated patterns: the cases whose id matches one (fnmatch: "
                             "'weights-*', '*jpeg*') or whose area is one ('weights', 'CAMs'); extended "
                             "cases included")
    parser.add_argument("--extended", action="store_true",
                        help="also run the extended cases (more variants of the same checks; ~2 minutes)")
    parser.add_argument("--list", action="store_true", help="print the case ids and exit")
    parser.add_argument("--keep", action="store_true",
                        help="keep the case folders (default: delete each once recorded) and the temporary "
                             "work folder (the fixtures in a --work folder are always kept, for reuse)")
    args = parser.parse_args(argv)
    chosen = select(cases(), args.only, args.extended)
    if args.list:
        for case in chosen:
            print(f"{case.id:45s} {case.area:10s} {'(extended) ' if case.extended else ''}{case.broken}")
        return 0
    if not chosen:
        parser.error(f"--only {args.only!r} matches no case")
    shared = Path(args.shared_data).resolve()
    if not ((shared / "voc12-mini" / "JPEGImages").is_dir()
            and (shared / "voc12" / "cls_labels.npy").is_file()):
        parser.error(f"--shared-data {shared}: expected voc12-mini/ and voc12/cls_labels.npy")
    temporary = args.work is None
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="lit_wsss_bad_inputs_"))
    try:
        work.relative_to(REPO)
        parser.error(f"--work {work} is inside the repository; use a folder outside it (e.g. /tmp)")
    except ValueError:
        pass
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"lit_wsss under test: {REPO}; work folder: {work}", file=sys.stderr, flush=True)
    fixtures = Fixtures(work, shared)
    fixture_seconds = fixtures.build()
    print(f"fixtures ready ({fixture_seconds:.0f} s)", file=sys.stderr, flush=True)
    results = []
    for index, case in enumerate(chosen, 1):
        result = run_case(case, work, fixtures)
        results.append(result)
        print(f"[{index}/{len(chosen)}] {case.id}: exit {result['exit_display']}, {result['verdict']} "
              f"({result['seconds']:.0f} s) {shorten(result['message'] or '', work, case.id)[:150]}",
              file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(work / "cases" / case.id, ignore_errors=True)
    meta = {
        "command": " ".join(["python", "benchmarks/bad_inputs.py",
                             *(sys.argv[1:] if argv is None else argv)]),
        "repo": str(REPO), "commit": git_commit(REPO), "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "python": sys.version.split()[0], "seconds": time.perf_counter() - start,
        "fixture_seconds": fixture_seconds, "work": str(work), "shared_data": str(shared),
        "omp_num_threads": run_env().get("OMP_NUM_THREADS"),
    }
    table = markdown(results, meta, work)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
        raw = json.dumps({"meta": meta, "results": results}, indent=1, default=str)
        out.with_suffix(".json").write_text(raw)
        print(f"wrote {out} and {out.with_suffix('.json')}", file=sys.stderr)
    if temporary and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
