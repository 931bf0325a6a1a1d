"""CAM -> confident "IR labels" with a dense CRF (``lit-wsss ir-labels``), the input of IRNet training.

Spec: ../shared/methods/protocol.md §6.1 (IRN ``step/cam_to_ir_label.py``, ``misc/imutils.py``
``crf_inference_label``), §8 (defaults), §11 item 5 (tests); sipe.md §5.3 and pitfall S3 (SIPE's
``cam2ir.py``); cpn.md §7 and pitfall C10 (CPN's halved export). Reimplemented from those specs.

Per image, with the uint8 RGB image and ``high_res`` (K, H, W) of a CAM file (keys = 0-based foreground
indices, ``keys' = (0, keys + 1)``)::

    fg = keys'[CRF(img, argmax([plane_fg, cam_1..K]))]      high-confidence map
    bg = keys'[CRF(img, argmax([plane_bg, cam_1..K]))]      low-confidence map
    label = fg;  label[fg == 0] = 255;  label[fg == 0 and bg == 0] = 0        -> uint8 {0..C, 255}

A pixel is class c where the high-confidence CRF map says c, background only where even the low-confidence
map says background, and 255 (ignored by IRNet) in between. Argmax ties go to the background (it comes
first, as with ``np.argmax`` over the padded array in the official code). The CRF is IRN's: unary from the
compact label map (``unary_from_labels(gt_prob=0.7, zero_unsure=False)``, ``n_labels = K + 1``), Gaussian
pairwise (sxy 3, compat 3), bilateral (sxy 50, srgb 5, compat 10) on the RGB image, 10 mean-field
iterations, argmax (:func:`crf_inference_label`).

Background conventions (:data:`CONVENTIONS`; chosen by the method that produced the CAMs):

``constant`` (IRN, protocol.md §5 table, §6.1, §8)
    Constant background planes: ``plane_fg = fg_threshold`` (conf_fg_thres 0.30), ``plane_bg =
    bg_threshold`` (conf_bg_thres 0.05) on max-normalised foreground CAMs. Files must not carry ``bg``.
``explicit`` (SIPE, sipe.md §5.3, pitfall S3; protocol.md §5 table, §12)
    The file's own background map replaces the planes: ``plane_fg = bg`` (full strength) and ``plane_bg =
    bg_factor * bg`` with ``bg_factor = 0.5`` (SIPE's "halving" of the IS-CAM background channel in
    ``cam2ir.py``). SIPE has no conf_fg/conf_bg thresholds ("the halving of the background plays that
    role"), so ``fg_threshold``/``bg_threshold`` must not be given. Files must carry ``bg``.
``cpn`` (CPN, cpn.md §7, pitfall C10)
    For files that still hold CPN's raw export: min-max normalised maps **divided by 2**. The halving is
    undone (CAMs x2) and constant planes are applied, i.e. ``argmax([t, 2 * cam])``. cpn.md gives no IR
    thresholds ("IRN's 0.30/0.05/0.25 do not carry over"; retune relative to CPN's best sweep tau), so
    both thresholds must be given explicitly. Every channel must have max <= 0.5 (a halved map), otherwise
    the file is refused: CPN files already scaled to unit range (protocol.md §12 adapter) use ``constant``
    with retuned thresholds.

Images without foreground keys (K = 0) are all background (the CRF is not run: one label has no unary).

Stage output: ``<out>/<id>.png`` palette PNGs (VOC colour map) and ``<out>/manifest.json`` recording the
input CAM folder and its manifest (minus the per-image table), the convention, thresholds, CRF parameters
and the ids. Files appear atomically; a rerun skips the ids whose PNG exists (one run per folder at a
time); a manifest written with other parameters makes the stage refuse unless ``overwrite=True``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lit_wsss.cam_files import cam_path, load_cam_file, read_cam_manifest
from lit_wsss.datamodules.files import find_image_folder, image_file, read_id_list, read_rgb, resolve_list
from lit_wsss.errors import ReportedError
from lit_wsss.io import (
    IGNORE_INDEX,
    TMP_SUFFIX,
    acquire_folder_lock,
    folder_lock,
    palette_png_bytes,
    release_folder_lock,
    write_bytes_atomic,
    write_json_atomic,
)

__all__ = [
    "CONVENTIONS",
    "CRF_PARAMS",
    "crf_inference_label",
    "ir_label",
    "make_ir_labels",
    "add_refinement_options",
    "build_parser",
    "ir_labels_of_list",
    "IRLabelStream",
    "main",
    "refinement_options",
]

STAGE = "ir-labels"
MANIFEST = "manifest.json"

#: Background conventions, see the module docstring.
CONVENTIONS = ("constant", "explicit", "cpn")
#: IRN ``run_sample.py`` conf_fg_thres / conf_bg_thres (protocol.md §8): the ``constant`` defaults.
DEFAULT_FG_THRESHOLD = 0.30
DEFAULT_BG_THRESHOLD = 0.05
#: SIPE ``cam2ir.py``: the background channel is halved for the low-confidence map (sipe.md §5.3, S3).
SIPE_BG_FACTOR = 0.5
#: CPN ``infer_cam.py`` halves its exported maps; the ``cpn`` convention multiplies them back (cpn.md §7).
CPN_CAM_SCALE = 2.0

#: IRN ``misc/imutils.py`` crf_inference_label (protocol.md §6.1, §8).
CRF_PARAMS: dict[str, Any] = {
    "iterations": 10,
    "gt_prob": 0.7,
    "unary": "unary_from_labels(zero_unsure=False), n_labels = K + 1 (compact indices)",
    "gaussian": {"sxy": 3, "compat": 3},
    "bilateral": {"sxy": 50, "srgb": 5, "compat": 10},
}

#: Manifest entries that must match for a rerun to resume into the same folder.
PARAMETER_KEYS = (
    "stage", "cams", "cams_producer", "cams_checkpoint", "cams_hparams", "cams_protocol",
    "convention", "fg_threshold", "bg_threshold", "bg_factor", "cam_scale", "crf",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------- per image


def crf_inference_label(
    image: np.ndarray,
    labels: np.ndarray,
    n_labels: int,
    t: int = 10,
    gt_prob: float = 0.7,
    gauss: tuple[float, float] = (3, 3),
    bilateral: tuple[float, float, float] = (50, 5, 10),
) -> np.ndarray:
    """IRN's dense CRF over a hard label map (protocol.md §6.1).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        labels: ``(H, W)`` integer compact label indices ``0..n_labels-1``.
        n_labels: number of labels (``K + 1``, at least 2).
        t: mean-field iterations.
        gt_prob: confidence of the given label in the unary (``unary_from_labels``, ``zero_unsure=False``).
        gauss: Gaussian pairwise ``(sxy, compat)``.
        bilateral: bilateral pairwise ``(sxy, srgb, compat)`` on the RGB image.

    Returns:
        ``(H, W)`` int64 argmax of the CRF marginals.
    """
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    image = np.ascontiguousarray(image, dtype=np.uint8)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got shape {image.shape}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels are {labels.shape} but the image is {image.shape[:2]} (H, W)")
    if n_labels < 2:
        raise ValueError(f"the CRF needs n_labels >= 2, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must lie in 0..{n_labels - 1}, got {labels.min()}..{labels.max()}")
    height, width = labels.shape
    crf = dcrf.DenseCRF2D(width, height, n_labels)
    unary = unary_from_labels(labels.astype(np.int64), n_labels, gt_prob=gt_prob, zero_unsure=False)
    crf.setUnaryEnergy(unary)
    crf.addPairwiseGaussian(sxy=gauss[0], compat=gauss[1])
    crf.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=image, compat=bilateral[2])
    q = np.asarray(crf.inference(t), dtype=np.float32).reshape(n_labels, height, width)
    return q.argmax(0)


def _resolve_parameters(
    convention: str, fg_threshold: float | None, bg_threshold: float | None, bg_factor: float | None
) -> dict[str, Any]:
    """The effective per-convention parameters (None where they do not apply); errors for misuse."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown background convention {convention!r}; expected one of {list(CONVENTIONS)}")
    given = {"fg_threshold": fg_threshold, "bg_threshold": bg_threshold, "bg_factor": bg_factor}
    for name, value in given.items():
        if value is not None and (isinstance(value, bool) or not math.isfinite(float(value))):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if convention == "explicit":
        if fg_threshold is not None or bg_threshold is not None:
            raise ValueError("the 'explicit' convention (SIPE, sipe.md §5.3) uses the file's bg map instead "
                             "of fg/bg thresholds: do not pass them")
        factor = SIPE_BG_FACTOR if bg_factor is None else float(bg_factor)
        return {"fg_threshold": None, "bg_threshold": None, "bg_factor": factor, "cam_scale": 1.0}
    if bg_factor is not None:
        raise ValueError(f"bg_factor applies to the 'explicit' convention only, not {convention!r}")
    if convention != "cpn":
        fg_threshold = DEFAULT_FG_THRESHOLD if fg_threshold is None else fg_threshold
        bg_threshold = DEFAULT_BG_THRESHOLD if bg_threshold is None else bg_threshold
    if fg_threshold is not None and bg_threshold is not None and float(fg_threshold) < float(bg_threshold):
        # the confident-foreground map pads the CAMs with the higher background score: fg below bg would
        # call confident foreground what the low-confidence map already calls background
        raise ValueError(f"fg threshold {fg_threshold} is below bg threshold {bg_threshold}: expected fg >= bg "
                         "(IRN: --fg 0.30 --bg 0.05)")
    if convention == "cpn":
        if fg_threshold is None or bg_threshold is None:
            raise ValueError("the 'cpn' convention needs explicit fg and bg thresholds: cpn.md §7 gives none "
                             "(IRN's 0.30/0.05 do not carry over; retune relative to CPN's best sweep tau)")
        return {"fg_threshold": float(fg_threshold), "bg_threshold": float(bg_threshold), "bg_factor": None,
                "cam_scale": CPN_CAM_SCALE}
    return {
        "fg_threshold": float(fg_threshold),
        "bg_threshold": float(bg_threshold),
        "bg_factor": None,
        "cam_scale": 1.0,
    }


def ir_label(
    image: np.ndarray,
    high_res: np.ndarray,
    keys: np.ndarray,
    fg_threshold: float | None = None,
    bg_threshold: float | None = None,
    bg: np.ndarray | None = None,
    convention: str = "constant",
    crf: Callable[[np.ndarray, np.ndarray, int], np.ndarray] = crf_inference_label,
    *,
    bg_factor: float | None = None,
) -> np.ndarray:
    """The IR label of one image (protocol.md §6.1), under a background convention (module docstring).

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        high_res: ``(K, H, W)`` float CAMs of the present classes.
        keys: ``(K,)`` 0-based foreground class indices.
        fg_threshold, bg_threshold: background planes of the high- and low-confidence maps. ``constant``:
            default 0.30 / 0.05 (IRN); ``cpn``: required (applied to the doubled maps); ``explicit``: must
            be None.
        bg: ``(H, W)`` explicit background map: required by ``explicit``, refused by the others.
        convention: ``"constant"`` (IRN), ``"explicit"`` (SIPE) or ``"cpn"`` (CPN's halved export).
        crf: ``crf(image, compact_labels, n_labels) -> (H, W)`` compact labels; injectable (tests mock it).
            It is called for the high-confidence map first, then for the low-confidence map.
        bg_factor: ``explicit`` only: factor on ``bg`` for the low-confidence map (default 0.5, SIPE).

    Returns:
        ``(H, W)`` uint8: ``keys + 1`` where confident, 0 confident background, 255 uncertain.
    """
    params = _resolve_parameters(convention, fg_threshold, bg_threshold, bg_factor)
    cams = np.asarray(high_res)
    keys = np.asarray(keys).reshape(-1)
    image = np.asarray(image)
    if cams.ndim != 3 or not np.issubdtype(cams.dtype, np.floating):
        raise ValueError(f"high_res must be floating (K, H, W), got {cams.dtype} {cams.shape}")
    if keys.shape != (cams.shape[0],) or (keys.size and not np.issubdtype(keys.dtype, np.integer)):
        raise ValueError(f"keys must be {cams.shape[0]} integers (one per high_res channel), got "
                         f"{keys.dtype} {keys.shape}")
    if keys.size and keys.min() < 0:
        raise ValueError(f"keys must be 0-based foreground indices, got {keys.tolist()}")
    if image.shape != (*cams.shape[1:], 3) or image.dtype != np.uint8:
        raise ValueError(f"image is {image.dtype} {image.shape} but high_res is {cams.shape[1:]}: expected "
                         "uint8 (H, W, 3)")
    if np.isnan(cams).any():
        raise ValueError("high_res contains NaN")
    if convention == "explicit":
        if bg is None:
            raise ValueError("the 'explicit' convention needs the file's bg map (SIPE, sipe.md §5.3)")
        bg = np.asarray(bg)
        if bg.shape != cams.shape[1:] or not np.issubdtype(bg.dtype, np.floating):
            raise ValueError(f"bg must be floating (H, W) = {cams.shape[1:]}, got {bg.dtype} {bg.shape}")
        if np.isnan(bg).any():
            raise ValueError("bg contains NaN")
    elif bg is not None:
        raise ValueError(f"the CAMs carry an explicit bg map but the convention is {convention!r}: use "
                         "'explicit' (protocol.md §5 table, sipe.md S10)")
    if convention == "cpn" and cams.size and cams.max() > 0.5:
        raise ValueError(f"'cpn' expects CPN's halved maps (every value <= 0.5, cpn.md §7), got max "
                         f"{float(cams.max()):.4g}; unit-scale CAMs use 'constant' with retuned thresholds")

    height, width = cams.shape[1:]
    if cams.shape[0] == 0:
        return np.zeros((height, width), np.uint8)
    # argmax over [plane, cam_1..K] with ties to the plane == where(max cam > plane, 1 + first argmax, 0);
    # one max/argmax serves both maps. Comparisons stay in the CAM dtype (a float32 plane, as in np.pad).
    top = cams.max(0)
    index = cams.argmax(0) + 1
    if params["cam_scale"] != 1.0:
        top = top * cams.dtype.type(params["cam_scale"])  # x2: exact in binary floating point
    if convention == "explicit":
        plane_fg = bg.astype(cams.dtype, copy=False)
        plane_bg = plane_fg * cams.dtype.type(params["bg_factor"])
    else:
        plane_fg = cams.dtype.type(params["fg_threshold"])
        plane_bg = cams.dtype.type(params["bg_threshold"])
    n_labels = cams.shape[0] + 1
    lookup = np.concatenate([[0], keys.astype(np.int64) + 1])  # keys' = (0, keys + 1)
    if lookup.max() >= IGNORE_INDEX:
        raise ValueError(f"keys up to {int(keys.max())} do not fit a uint8 label map with 255 = ignore")

    def confident_map(plane: Any) -> np.ndarray:
        """keys'[crf(argmax([plane, cams]))], the CRF output checked (it may be a test double)."""
        result = np.asarray(crf(image, np.where(top > plane, index, 0), n_labels))
        if result.shape != (height, width) or not np.issubdtype(result.dtype, np.integer):
            raise ValueError(f"crf returned {result.dtype} {result.shape}, expected integers of shape "
                             f"({height}, {width})")
        if result.min() < 0 or result.max() >= n_labels:
            raise ValueError(f"crf returned labels outside 0..{n_labels - 1}")
        return lookup[result]

    fg = confident_map(plane_fg)  # high-confidence map first, then the low-confidence one
    bg_map = confident_map(plane_bg)
    label = fg.astype(np.uint8)
    label[fg == 0] = IGNORE_INDEX
    label[(fg == 0) & (bg_map == 0)] = 0
    return label


# ----------------------------------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class _Job:
    """What a worker needs for any id (pickled once per chunk)."""

    cams_dir: str
    image_dir: str
    out_dir: str
    convention: str
    fg_threshold: float | None
    bg_threshold: float | None
    bg_factor: float | None
    crf_gaussian_compat: float = 3


def _process(job: _Job, image_id: str) -> str:
    """Read one CAM file and its image, write ``<out>/<id>.png``; errors name the files."""
    cam_file = cam_path(job.cams_dir, image_id)
    image_path = image_file(Path(job.image_dir), image_id)
    keys, high_res, bg = load_cam_file(cam_file)
    if high_res.ndim != 3:
        raise ValueError(f"CAM file {cam_file}: high_res must be (K, H, W), got shape {high_res.shape}")
    return _label_and_write(job, image_id, image_path, keys, high_res, bg, f"CAM file {cam_file}")


def _label_and_write(job: _Job, image_id: str, image_path: str | Path, keys: np.ndarray, high_res: np.ndarray,
                     bg: np.ndarray | None, source: str) -> str:
    """The IR label of one image from its CAMs (``source`` names them in errors), written as ``<out>/<id>.png``."""
    image = read_rgb(Path(image_path))
    if image.shape[:2] != high_res.shape[1:]:
        raise ValueError(f"size mismatch for id {image_id!r}: image {image_path} is {image.shape[1]}x"
                         f"{image.shape[0]} but {source} has high_res of {high_res.shape[2]}x"
                         f"{high_res.shape[1]} (width x height)")
    try:
        crf = functools.partial(crf_inference_label, gauss=(CRF_PARAMS["gaussian"]["sxy"], job.crf_gaussian_compat))
        label = ir_label(image, high_res, keys, job.fg_threshold, job.bg_threshold, bg=bg,
                         convention=job.convention, bg_factor=job.bg_factor, crf=crf)
    except ValueError as error:
        raise ValueError(f"{source} (image {image_path}): {error}") from None
    write_bytes_atomic(Path(job.out_dir) / f"{image_id}.png", palette_png_bytes(label))
    return image_id


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)  # one image per process: no nested thread pools on a shared machine


def worker_context() -> multiprocessing.context.BaseContext:
    """forkserver where available (safe with torch loaded, and the heavy imports are paid once by the
    server, not by every worker), else spawn."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # the default preload plus this module; no effect if this process's server already runs
        context.set_forkserver_preload(["__main__", "lit_wsss.refine.ir_labels"])
        return context
    return multiprocessing.get_context("spawn")


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """The parameter entries of a manifest, JSON-normalised (tuples -> lists, keys -> str)."""
    subset = {key: record.get(key) for key in PARAMETER_KEYS}
    return json.loads(json.dumps(subset, sort_keys=True, default=str))


def make_ir_labels(
    cams_dir: str | Path,
    root: str | Path,
    ids: Sequence[str],
    out_dir: str | Path,
    fg: float | None = None,
    bg: float | None = None,
    convention: str = "constant",
    workers: int = 1,
    progress: bool = True,
    *,
    bg_factor: float | None = None,
    overwrite: bool = False,
    crf_gaussian_compat: float = 3,
) -> dict[str, Any]:
    """IR labels of a folder of CAM files (protocol.md §6.1): one palette PNG per id, plus a manifest.

    Args:
        cams_dir: folder of ``<id>.npz`` CAM files (and optionally their ``manifest.json``).
        root: VOC-layout root (``<root>/JPEGImages/<id>.jpg``) or a folder data set's (``<root>/images/<id>.*``).
        ids: image ids (no repeats).
        out_dir: output folder (created): ``<id>.png`` with values ``0..C`` and 255, ``manifest.json``.
        fg, bg: thresholds of the high/low-confidence maps; see :func:`ir_label` per convention
            (``constant`` default 0.30 / 0.05, ``cpn`` required, ``explicit`` not allowed).
        convention: background convention, one of :data:`CONVENTIONS`.
        workers: processes; 1 runs in this process.
        progress: tqdm progress bar on stderr.
        bg_factor: ``explicit`` only, default 0.5 (SIPE's halving).
        overwrite: recompute every id and replace a manifest of other parameters (default: resume, refuse).
        crf_gaussian_compat: compat of the CRF's Gaussian term: IRN's helper uses 3, GSLM's refiner 10
            (cls.md §2.3).

    Returns:
        ``written``, ``skipped`` (PNG already there), ``seconds``, ``images_per_second`` (written / seconds),
        ``out``, ``manifest`` (its path).

    Raises:
        FileNotFoundError: the CAM folder, a listed CAM file or image is missing (named).
        FileExistsError: ``out_dir`` holds IR labels made with other parameters (the keys are named).
        FolderInUseError: another live process is writing ``out_dir`` (a ``RuntimeError``; the holder named).
        ValueError: bad parameters, malformed CAM files, image/CAM size mismatch (both files named).
    """
    start = time.perf_counter()
    cams_dir, root, out_dir = Path(cams_dir), Path(root), Path(out_dir)
    ids = [str(i) for i in ids]
    params = _resolve_parameters(convention, fg, bg, bg_factor)
    if not ids:
        raise ValueError("no image ids given")
    if len(set(ids)) != len(ids):
        repeated = sorted(i for i, count in Counter(ids).items() if count > 1)
        raise ValueError(f"the id list repeats {len(repeated)} id(s), e.g. {repeated[:5]}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not cams_dir.is_dir():
        raise FileNotFoundError(f"CAM folder not found: {cams_dir}")
    image_dir = find_image_folder(root)
    for image_id in ids:  # fail before the long loop
        if not cam_path(cams_dir, image_id).is_file():
            raise FileNotFoundError(f"no CAM file for id {image_id!r}: {cam_path(cams_dir, image_id)} is missing")
        image_file(image_dir, image_id)

    manifest = _stage_manifest(cams_dir, read_cam_manifest(cams_dir), root, convention, params, crf_gaussian_compat)

    # one writer per folder: a second would delete this one's temporary files as leftovers
    with folder_lock(out_dir, STAGE):
        all_ids = _open_folder(out_dir, manifest, ids, overwrite)
        todo = ids if overwrite else [i for i in ids if not (out_dir / f"{i}.png").is_file()]
        job = _Job(str(cams_dir), str(image_dir), str(out_dir), convention,
                   params["fg_threshold"], params["bg_threshold"], params["bg_factor"], crf_gaussian_compat)
        bar = tqdm(total=len(todo), desc=STAGE, unit="img", disable=not progress)
        try:
            if workers == 1 or len(todo) <= 1:
                for image_id in todo:
                    _process(job, image_id)
                    bar.update()
            elif todo:
                processes = min(int(workers), len(todo))
                chunksize = max(1, min(8, len(todo) // (4 * processes)))
                with worker_context().Pool(processes, initializer=_init_worker) as pool:
                    for _ in pool.imap_unordered(functools.partial(_process, job), todo, chunksize=chunksize):
                        bar.update()
        finally:
            bar.close()
        seconds = time.perf_counter() - start
        _close_folder(out_dir, manifest, all_ids, written=len(todo), skipped=len(ids) - len(todo), workers=workers)
        return {
            "written": len(todo),
            "skipped": len(ids) - len(todo),
            "seconds": seconds,
            "images_per_second": len(todo) / seconds if seconds > 0 else 0.0,
            "out": str(out_dir),
            "manifest": str(out_dir / MANIFEST),
        }


def _stage_manifest(cams_dir: Path, cams_manifest: dict[str, Any], root: Path, convention: str,
                    params: dict[str, Any], crf_gaussian_compat: float) -> dict[str, Any]:
    """The IR-label manifest without its ids: the CAMs' producer (from their manifest, or from the ``run.json`` of
    an export still running), the convention, thresholds and CRF. :data:`PARAMETER_KEYS` decide resuming."""
    cams_manifest = {k: v for k, v in cams_manifest.items() if k != "images"}
    return {
        "stage": STAGE,
        "cams": str(cams_dir.resolve()),
        "cams_producer": cams_manifest.get("producer"),
        "cams_checkpoint": cams_manifest.get("checkpoint"),
        "cams_hparams": cams_manifest.get("hparams"),
        "cams_protocol": cams_manifest.get("protocol"),
        "convention": convention,
        **params,
        "crf": {**CRF_PARAMS, "gaussian": {**CRF_PARAMS["gaussian"], "compat": crf_gaussian_compat}},
        "cams_manifest": cams_manifest,
        "root": str(root.resolve()),
        "spec": "../shared/methods/protocol.md §6.1; conventions: protocol.md §5, sipe.md §5.3, cpn.md §7",
        "values": "0 background, keys + 1 classes, 255 uncertain (ignored)",
    }


def _open_folder(out_dir: Path, manifest: dict[str, Any], ids: Sequence[str], overwrite: bool) -> list[str]:
    """Before the first PNG, under the folder's lock: refuse a folder of other parameters (unless ``overwrite``,
    which removes their labels of ids not listed now), remove a killed run's temporary files, and pin the
    parameters in an incomplete manifest, so that an interrupted run is resumed only with the same ones.

    Returns:
        Every id the folder will hold: the finished ids of earlier runs with these parameters, then ``ids``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / MANIFEST
    previous_ids: list[str] = []
    if manifest_path.is_file():
        try:
            previous = json.loads(manifest_path.read_text())
            previous_listed = [str(i) for i in previous.get("ids", [])]
        except (OSError, ValueError, AttributeError, TypeError) as error:
            if not overwrite:
                raise ValueError(f"cannot read {manifest_path}: {error} (overwrite replaces it)") from None
            previous, previous_listed = {}, []
        before, now = _comparable(previous), _comparable(manifest)
        changed = sorted(key for key in PARAMETER_KEYS if before.get(key) != now.get(key))
        if changed and not overwrite:
            raise FileExistsError(f"{out_dir} holds IR labels made with other parameters (differs in "
                                  f"{changed}, see {manifest_path}); use a new folder or overwrite")
        if changed:  # overwrite: labels of the old parameters that this run does not redo must not linger
            for image_id in set(previous_listed) - set(ids):
                (out_dir / f"{image_id}.png").unlink(missing_ok=True)
        else:
            previous_ids = [i for i in previous_listed if (out_dir / f"{i}.png").is_file()]
    elif not overwrite:
        foreign = [i for i in ids if (out_dir / f"{i}.png").is_file()]
        if foreign:
            raise FileExistsError(f"{out_dir} holds {len(foreign)} PNG(s) of listed ids (e.g. "
                                  f"{foreign[0]}.png) but no {MANIFEST}: their parameters are unknown; use a "
                                  "new folder or overwrite")
    for leftover in out_dir.glob(f"*{TMP_SUFFIX}"):  # from a killed run
        leftover.unlink(missing_ok=True)
    known = set(ids)
    all_ids = [i for i in previous_ids if i not in known] + list(ids)
    write_json_atomic(manifest_path, {**manifest, "complete": False, "count": len(all_ids), "ids": all_ids})
    return all_ids


def _close_folder(out_dir: Path, manifest: dict[str, Any], all_ids: list[str], *, written: int, skipped: int,
                  workers: int, **extra: Any) -> None:
    """The complete manifest, once every PNG of ``all_ids`` is written."""
    write_json_atomic(out_dir / MANIFEST, {
        **manifest, "complete": True, "count": len(all_ids), "ids": all_ids,
        "written_this_run": written, "skipped_this_run": skipped, "workers": int(workers), **extra,
    })


class IRLabelStream:
    """IR labels made while the CAMs are exported (``CAMWriter(ir_labels={...})``, issue 18): each image's CRF
    runs in a worker pool on the maps the writer holds, while the network goes on to the next image, so that a
    GPU export and the CPU's CRF overlap and nothing re-reads the CAM files.

    The folder is the one :func:`make_ir_labels` writes from the finished CAM folder: the same PNGs (the maps are
    the float32 ones the CAM file stores; with ``CAMWriter(dtype="float16")`` or compact files the stream uses
    the unrounded maps, the tool the stored ones) and a manifest with the same parameters, so ``lit-wsss
    ir-labels`` and the pipeline's IR-label stage find it finished.

    Life cycle, driven by the writer: :meth:`open` (the process that holds the CAM folder's lock, before any
    image; pins the parameters), :meth:`start` (every process: its pool), :meth:`submit` per image,
    :meth:`wait` (every process: all its images written, the first worker error raised), :meth:`close` (the
    lock holder, after the CAM manifest: the complete manifest); :meth:`stop` on failure.

    Args:
        out_dir: the IR-label folder.
        convention, fg, bg, bg_factor, crf_gaussian_compat: :func:`make_ir_labels`.
        workers: CRF processes of each exporting process (at least 1).
        max_pending: images handed to the pool and not yet written, at most (default ``2 * workers``): a
            faster network waits for the CRF instead of holding every image's maps in memory.
    """

    OPTIONS = ("out_dir", "convention", "fg", "bg", "bg_factor", "crf_gaussian_compat", "workers", "max_pending")

    def __init__(self, out_dir: str | Path, convention: str = "constant", fg: float | None = None,
                 bg: float | None = None, bg_factor: float | None = None, crf_gaussian_compat: float = 3,
                 workers: int = 1, max_pending: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.convention = convention
        self.params = _resolve_parameters(convention, fg, bg, bg_factor)
        if int(workers) < 1:
            raise ValueError(f"IR-label stream: workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.max_pending = int(max_pending) if max_pending else 2 * self.workers
        self.crf_gaussian_compat = crf_gaussian_compat
        self._job = _Job("", "", str(self.out_dir), convention, self.params["fg_threshold"],
                         self.params["bg_threshold"], self.params["bg_factor"], crf_gaussian_compat)
        self._pool: Any = None
        self._pending: list[Any] = []
        self._manifest: dict[str, Any] = {}
        self._all_ids: list[str] = []
        self._locked = False

    @classmethod
    def from_options(cls, options: dict[str, Any], default_convention: str) -> IRLabelStream:
        """From a writer's ``ir_labels`` mapping (:data:`OPTIONS`; ``out_dir`` required); an unknown key is an
        error that names it. ``convention`` defaults to the CAM method's."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown or "out_dir" not in options:
            raise ValueError(f"ir_labels options {sorted(options)}: unknown {unknown}; expected out_dir and some of "
                             f"{list(cls.OPTIONS[1:])}")
        return cls(**{"convention": default_convention, **options})

    def finished(self, image_id: str) -> bool:
        return (self.out_dir / f"{image_id}.png").is_file()

    def open(self, cams_dir: Path, run: dict[str, Any], root: Path, all_ids: Sequence[str], overwrite: bool) -> None:
        """Lock the folder, check and pin the parameters (``run``: the CAM export's ``run.json``)."""
        self._manifest = _stage_manifest(cams_dir, run, root, self.convention, self.params, self.crf_gaussian_compat)
        acquire_folder_lock(self.out_dir, STAGE)
        self._locked = True
        self._all_ids = _open_folder(self.out_dir, self._manifest, list(all_ids), overwrite)

    def start(self) -> None:
        self._pool = worker_context().Pool(self.workers, initializer=_init_worker)

    def submit(self, image_id: str, image_path: str | Path, keys: np.ndarray, high_res: np.ndarray,
               bg: np.ndarray | None = None) -> None:
        """Hand one image to the pool; first waits while :attr:`max_pending` images are in it."""
        while len(self._pending) >= self.max_pending:
            self._pending.pop(0).get()  # re-raises the worker's error, which names the id and the image
        source = f"the CAMs of id {image_id!r}"
        self._pending.append(self._pool.apply_async(
            _label_and_write, (self._job, image_id, str(image_path), keys, high_res, bg, source)))

    def wait(self) -> None:
        """Every submitted image written (the first error raised); the pool is closed."""
        while self._pending:
            self._pending.pop(0).get()
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def close(self, cams_manifest: dict[str, Any], written: int) -> None:
        """The complete manifest (``cams_manifest``: the finished CAM folder's; ``written``: this export's images over
        every process); the folder's lock is released."""
        missing = [i for i in self._all_ids if not self.finished(i)]
        if missing:
            raise RuntimeError(f"{len(missing)} IR labels missing in {self.out_dir} after the export, e.g. {missing[:5]}")
        self._manifest["cams_manifest"] = {k: v for k, v in cams_manifest.items() if k != "images"}
        _close_folder(self.out_dir, self._manifest, self._all_ids, written=written,
                      skipped=len(self._all_ids) - written, workers=self.workers, streamed=True)
        release_folder_lock(self.out_dir)
        self._locked = False

    def stop(self) -> None:
        """After a failure: workers terminated, lock released (a rerun resumes)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        self._pending = []
        if self._locked:
            release_folder_lock(self.out_dir)
            self._locked = False


# --------------------------------------------------------------------------------------------------- CLI


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def manifest_convention(cams_dir: Path) -> str:
    """The background convention a CAM folder's manifest records (``protocol.cam.background_convention``,
    written by every lit_wsss CAM export); ``constant`` for folders without one (e.g. converted files)."""
    manifest = read_cam_manifest(cams_dir)
    cam = (manifest.get("protocol") or {}).get("cam") or {}
    return str(cam.get("background_convention", "constant"))


def add_refinement_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that set how CAMs are cut into IR labels (shared by ``lit-wsss ir-labels`` and the
    ``--ir-args`` of ``lit-wsss pipeline``, read by :func:`refinement_options`)."""
    parser.add_argument("--fg", type=float, default=None,
                        help=f"high-confidence background plane (constant: default {DEFAULT_FG_THRESHOLD}; "
                             "cpn: required; explicit: not allowed)")
    parser.add_argument("--bg", type=float, default=None,
                        help=f"low-confidence background plane (constant: default {DEFAULT_BG_THRESHOLD}; "
                             "cpn: required; explicit: not allowed)")
    parser.add_argument("--convention", choices=CONVENTIONS, default=None,
                        help="background convention of the CAMs: constant (IRN), explicit (SIPE: the files' "
                             "bg map, halved for the low-confidence map), cpn (CPN's halved export, x2); "
                             "default: the one the CAM manifest records, else constant")
    parser.add_argument("--bg-factor", type=float, default=None,
                        help="explicit only: factor on bg for the low-confidence map "
                             f"(default {SIPE_BG_FACTOR}, SIPE's halving)")
    parser.add_argument("--crf-gaussian-compat", type=float, default=3,
                        help="compat of the CRF's Gaussian term (IRN 3; GSLM's seeds use 10, cls.md §2.3)")
    return parser


REFINEMENT_OPTIONS = ("fg", "bg", "convention", "bg_factor", "crf_gaussian_compat")


def refinement_options(argv: Sequence[str]) -> dict[str, Any]:
    """``["--fg", "0.5", ...]`` -> keyword arguments of :func:`ir_labels_of_list`; an unknown option is an
    error that names it."""
    parser = add_refinement_options(argparse.ArgumentParser(prog=f"{STAGE} options", add_help=False,
                                                            exit_on_error=False))
    try:
        values, unknown = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as error:
        raise ValueError(f"IR-label options {list(argv)}: {error}") from None
    if unknown:
        raise ValueError(f"IR-label options: unknown {unknown}; expected some of "
                         + ", ".join("--" + name.replace("_", "-") for name in REFINEMENT_OPTIONS))
    return vars(values)


def ir_labels_of_list(
    cams_dir: str | Path,
    root: str | Path,
    list_name: str,
    out_dir: str | Path,
    *,
    convention: str | None = None,
    workers: int = 1,
    progress: bool = True,
    **options: Any,
) -> dict[str, Any]:
    """:func:`make_ir_labels` of the ids of a split list (a path, or a name under ``root``); the background
    convention defaults to the one the CAM manifest records. What ``lit-wsss ir-labels`` runs."""
    root = Path(root)
    ids = read_id_list(resolve_list(root, list_name))
    convention = convention or manifest_convention(Path(cams_dir))
    return make_ir_labels(cams_dir, root, ids, out_dir, convention=convention, workers=workers, progress=progress,
                          **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"lit-wsss {STAGE}",
        description="CAMs -> confident IR labels (fg class / background / 255) with IRN's dense CRF "
                    "(protocol.md §6.1). One palette PNG per id and a manifest.json; reruns resume.",
    )
    parser.add_argument("--cams", required=True, help="folder of <id>.npz CAM files")
    parser.add_argument("--root", required=True, help="root with JPEGImages/ (VOC) or images/ (a folder data set)")
    parser.add_argument("--list", default="train_aug",
                        help="split list: a path, or a name looked up in <root>/ImageSets/Segmentation and "
                             "<root> (IRN or SIPE line format; default: train_aug)")
    add_refinement_options(parser)
    parser.add_argument("--out", required=True, help="output folder of <id>.png and manifest.json")
    parser.add_argument("--workers", type=int, default=_default_workers(),
                        help="processes (default: available CPUs; 1 = in-process)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute every id, even into a folder made with other parameters")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``lit-wsss ir-labels --cams DIR --root ROOT --list IDS.txt --fg 0.30 --bg 0.05 --out DIR --workers N``.

    Returns 0 on success, 1 when files are missing or malformed or the parameters do not fit (named).
    """
    args = build_parser().parse_args(argv)
    try:
        result = ir_labels_of_list(
            args.cams, args.root, args.list, args.out, workers=args.workers, progress=not args.no_progress,
            overwrite=args.overwrite, **{name: getattr(args, name) for name in REFINEMENT_OPTIONS},
        )
    except (OSError, ValueError, ReportedError) as error:
        print(f"{STAGE}: error: {error}", file=sys.stderr)
        return 1
    print(f"{STAGE}: {result['written']} written, {result['skipped']} skipped in {result['seconds']:.1f} s "
          f"({result['images_per_second']:.2f} images/s) -> {result['out']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
