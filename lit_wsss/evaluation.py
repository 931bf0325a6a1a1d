"""CAM evaluation: one-pass background-threshold sweep over a folder of CAM files (``lit-wsss eval-cam``).

Protocol (../shared/methods/protocol.md §5, pitfalls P8, P9): the prediction of an image is IRN's
``argmax([tau, high_res_1..K])`` mapped through ``(0, keys + 1)`` (:func:`lit_wsss.cams.cams_to_mask`); ONE
confusion matrix is accumulated over every pixel of every image (ground truth 255 ignored) and the mIoU is the
nan-mean of the per-class IoUs (:func:`lit_wsss.metrics.miou_from_confusion`). IRN reports a single fixed
threshold (0.15); later repos sweep it. A threshold picked on the evaluation masks is optimistic, so both
the fixed-threshold and the oracle (best-on-these-masks) numbers are reported, labelled as such.

Which classes the mean is taken over (``--mean-over``): ``union`` (default; IRN, chainercv: every class with
a non-empty union of prediction and ground truth) or ``ground_truth`` (VWE ``utils/pyutils.py``: only the
classes present in the ground truth, so a class that is predicted but absent costs nothing). Both values,
the pixel accuracy and the mean class accuracy (mean recall over the classes present in the ground truth,
VWE's "Mean Accuracy") are in every result, from the same confusion matrix.

CAM files (protocol.md §12): ``<cams>/<id>.npz`` holding ``keys`` int64 (K,) 0-based foreground indices,
``high_res`` float32 (K, H, W), ``cam`` (K, ceil(H/4), ceil(W/4)) (not used here) and optionally ``bg``
float32 (H, W) for methods that predict their own background; those files are scored by a plain argmax over
``[bg, high_res_1..K]`` (no threshold) in a separate confusion. ``<cams>/manifest.json`` may give the
default fixed threshold as ``"bg_threshold"``. Every other file in the folder is ignored.

The sweep is exact and costs about one decoding: at threshold ``t`` a pixel is background iff
``max_k cam_k <= t`` (argmax ties go to the background plane, which comes first), otherwise it is class
``keys[argmax_k cam_k] + 1`` (the first maximum) whatever ``t`` is. So the max ``m`` and argmax ``c`` are
computed once per pixel, ``m`` is bucketed against the sorted thresholds, one joint histogram over
(ground truth, ``c``, bucket) is taken, and cumulative sums over the buckets give every threshold's matrix.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from lit_wsss.cam_files import DEFAULT_BG_THRESHOLD, cam_path, load_cam_file, read_cam_manifest
from lit_wsss.datamodules.files import find_mask_folder, read_id_list, read_mask, resolve_list
from lit_wsss.datamodules.labels import VOC_CLASSES, read_class_list
from lit_wsss.io import IGNORE_INDEX, producer_num_classes, read_manifest
from lit_wsss.scores import (
    ARGMAX_LABEL,
    MEAN_OVER,
    argmax_confusion,
    score_block,
    sweep_confusions,
    sweep_summary,
    threshold_index,
)

#: eval-cam's default sweep (start:stop:step, stop inclusive).
DEFAULT_THRESHOLDS = "0.0:0.6:0.03"

__all__ = [
    "eval_cam",
    "evaluate_cam_folder",
    "evaluate_label_folder",
    "write_reports",
    "headline",
    "parse_thresholds",
    "main",
]

# --------------------------------------------------------------------------------------------------- folder


def _default_class_names(num_classes: int) -> list[str]:
    if num_classes == len(VOC_CLASSES):
        return ["background", *VOC_CLASSES]
    foreground = [f"class_{i}" for i in range(1, num_classes + 1)]
    return ["background", *foreground]


def evaluate_cam_folder(
    cams_dir: str | Path,
    root: str | Path,
    ids: Sequence[str],
    thresholds: Sequence[float],
    num_classes: int | None = None,
    mask_dir: str | Path | None = None,
    fixed_threshold: float | None = None,
    *,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    mean_over: str = "union",
) -> dict[str, Any]:
    """Dataset-level CAM mIoU of a folder of CAM files at every threshold of a sweep (protocol.md §5).

    Files are streamed one at a time (memory does not grow with the number of images); one confusion per
    threshold is accumulated over the whole dataset.

    Args:
        cams_dir: folder of ``<id>.npz`` CAM files (optionally ``manifest.json``).
        root: VOC-layout root; ground truth is ``<root>/SegmentationClass/<id>.png``, or
            ``<root>/SegmentationClassAug`` when the first folder does not exist.
        ids: image ids to score (each must have a CAM file and a mask).
        thresholds: the sweep of background planes ``tau`` (reported in this order).
        num_classes: foreground classes ``C``; default the producer's (manifest), else VOC's 20. Checked
            against every other source that states a count (:func:`resolve_classes`).
        mask_dir: ground-truth folder overriding the default (a path, or a name under ``root``).
        fixed_threshold: the pre-registered threshold; default the manifest's ``bg_threshold``, else IRN's
            0.15 (:data:`lit_wsss.cam_files.DEFAULT_BG_THRESHOLD`). Evaluated even if it is not in the sweep.
        class_names: ``C+1`` names (background first) or ``C`` foreground names; default ``<root>/classes.txt``,
            else VOC's.
        progress: show a tqdm progress bar (stderr).
        mean_over: the class set every mIoU averages over (:data:`MEAN_OVER`); both values are reported.

    Returns:
        A JSON-serialisable dict (nan written as None): ``thresholds``, ``miou`` (per threshold), ``iou``,
        ``precision``, ``recall`` (per threshold, per class), ``confusion`` (per threshold), ``best``
        (oracle), ``fixed``, ``num_images``, ``class_names``, ``ground_truth``, ``mode`` and, when some files
        carry ``bg``, ``bg_argmax``. When EVERY file carries ``bg`` the sweep does not apply: ``mode`` is
        ``"bg_argmax"``, the sweep lists are empty, ``best``/``fixed`` are None and ``note`` says so.

    Raises:
        FileNotFoundError: a listed id has no CAM file or no mask (the message names it).
        ValueError: malformed CAM file, mask values outside ``0..C``/255, or mask and CAM sizes differ
            (the message names the files).
    """
    cams_dir, root = Path(cams_dir), Path(root)
    ids = list(ids)
    sweep = [float(t) for t in np.asarray(thresholds, dtype=np.float64).reshape(-1)]
    if not ids:
        raise ValueError("no image ids to evaluate")
    if not sweep:
        raise ValueError("no thresholds given")
    if mean_over not in MEAN_OVER:
        raise ValueError(f"mean_over must be one of {list(MEAN_OVER)}, got {mean_over!r}")
    duplicates = sorted(i for i, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ValueError(f"the id list repeats {len(duplicates)} id(s), e.g. {duplicates[:5]}")
    if not cams_dir.is_dir():
        raise FileNotFoundError(f"CAM folder not found: {cams_dir}")
    gt_dir = find_mask_folder(root, mask_dir)
    manifest = read_cam_manifest(cams_dir)
    num_classes, names = resolve_classes(num_classes, cams_dir, manifest, class_names, root)
    if fixed_threshold is None:  # CAMWriter writes "bg_threshold": null when the producer recorded none
        fixed_threshold = manifest.get("bg_threshold")
    if fixed_threshold is None:
        fixed_threshold = DEFAULT_BG_THRESHOLD
    fixed_threshold = float(fixed_threshold)

    # Fail before the long loop: every listed id needs its CAM file and its mask.
    cam_paths = [cam_path(cams_dir, i) for i in ids]
    mask_paths = [gt_dir / f"{i}.png" for i in ids]
    for image_id, path in zip(ids, cam_paths):
        if not path.is_file():
            raise FileNotFoundError(f"no CAM file for id {image_id!r}: {path} is missing")
    for image_id, path in zip(ids, mask_paths):
        if not path.is_file():
            raise FileNotFoundError(f"no ground-truth mask for id {image_id!r}: {path} is missing")

    fixed_index = threshold_index(fixed_threshold, sweep)
    planes = sweep if fixed_index is not None else [*sweep, fixed_threshold]
    n = num_classes + 1
    sweep_total = np.zeros((len(planes), n, n), np.int64)
    argmax_total = np.zeros((n, n), np.int64)
    swept = with_bg = 0
    for image_id, cam_file, mask_path in tqdm(
        list(zip(ids, cam_paths, mask_paths)), desc="eval-cam", unit="img", disable=not progress
    ):
        keys, high_res, bg = load_cam_file(cam_file)
        if high_res.ndim != 3:
            raise ValueError(f"CAM file {cam_file}: high_res must be (K, H, W), got shape {high_res.shape}")
        try:
            gt = read_mask(mask_path, tuple(high_res.shape[1:]), num_classes)
        except ValueError as error:
            raise ValueError(f"id {image_id!r}: {error} -- CAM file {cam_file} has high_res of "
                             f"{high_res.shape[2]}x{high_res.shape[1]} (width x height)") from None
        try:
            if bg is None:
                sweep_total += sweep_confusions(high_res, keys, gt, planes, num_classes)
                swept += 1
            else:
                argmax_total += argmax_confusion(high_res, keys, gt, bg, num_classes)
                with_bg += 1
        except ValueError as error:
            raise ValueError(f"CAM file {cam_file} (mask {mask_path}): {error}") from None

    result: dict[str, Any] = {
        "cams": str(cams_dir),
        "ground_truth": str(gt_dir),
        "num_images": len(ids),
        "num_classes": num_classes,
        "class_names": names,
        "mean_over": mean_over,
        "mode": "sweep" if with_bg == 0 else ("bg_argmax" if swept == 0 else "mixed"),
        # the manifest minus its per-image table (CAMWriter's "images": one entry per id, large)
        "manifest": {key: value for key, value in manifest.items() if key != "images"},
    }
    if swept:
        result.update(sweep_summary(sweep_total, sweep, fixed_threshold, mean_over))
        result["num_images_swept"] = swept
    else:
        result.update(thresholds=[], miou=[], iou=[], precision=[], recall=[], confusion=[],
                      num_images_swept=0, best=None, fixed=None,
                      note="every CAM file has an explicit 'bg' map: the background-threshold sweep does not "
                           "apply; only the plain argmax over [bg, high_res] is reported (bg_argmax)")
    if with_bg:
        result["bg_argmax"] = score_block(argmax_total, mean_over, chosen=ARGMAX_LABEL, num_images=with_bg)
        if swept:
            result["note"] = (f"mixed folder: {swept} files without 'bg' are in the sweep, {with_bg} files "
                              "with 'bg' only in bg_argmax; neither covers the whole list")
    return result


def evaluate_label_folder(
    pred_dir: str | Path,
    root: str | Path,
    ids: Sequence[str],
    num_classes: int | None = None,
    mask_dir: str | Path | None = None,
    *,
    class_names: Sequence[str] | None = None,
    progress: bool = True,
    mean_over: str = "union",
) -> dict[str, Any]:
    """Dataset-level mIoU of a folder of label maps (``<id>.png``: 0 background, c + 1 class c; a segmentation
    network's predictions or any pseudo labels) against the ground truth, one confusion matrix over every pixel.

    Returns a JSON-serialisable dict: ``predictions``, ``ground_truth``, ``num_images``, ``num_classes``,
    ``class_names``, ``mean_over``, ``manifest`` (the folder's, without its per-image table) and the scores of
    :func:`_block` (``miou``, both class sets, accuracies, per-class IoU / precision / recall, ``confusion``).

    Raises:
        FileNotFoundError: a listed id has no prediction or no mask (named).
        ValueError: a prediction or mask of the wrong size, mode or values (the file is named).
    """
    pred_dir, root = Path(pred_dir), Path(root)
    ids = list(ids)
    if not ids:
        raise ValueError("no image ids to evaluate")
    if mean_over not in MEAN_OVER:
        raise ValueError(f"mean_over must be one of {list(MEAN_OVER)}, got {mean_over!r}")
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")
    gt_dir = find_mask_folder(root, mask_dir)
    manifest = read_manifest(pred_dir, "predictions")
    num_classes, names = resolve_classes(num_classes, pred_dir, manifest, class_names, root)
    pairs = [(i, pred_dir / f"{i}.png", gt_dir / f"{i}.png") for i in ids]
    for image_id, prediction, mask in pairs:
        for path, what in ((prediction, "prediction"), (mask, "ground-truth mask")):
            if not path.is_file():
                raise FileNotFoundError(f"no {what} for id {image_id!r}: {path} is missing")
    n = num_classes + 1
    total = np.zeros((n, n), np.int64)
    for image_id, prediction_path, mask_path in tqdm(pairs, desc="eval-seg", unit="img", disable=not progress):
        with Image.open(mask_path) as png:
            shape = (png.height, png.width)
        gt = read_mask(mask_path, shape, num_classes)
        try:
            prediction = read_mask(prediction_path, shape, num_classes)
        except ValueError as error:
            raise ValueError(f"id {image_id!r}: {error} (ground truth {mask_path})") from None
        valid = gt != IGNORE_INDEX
        if (prediction[valid] == IGNORE_INDEX).any():
            raise ValueError(f"prediction {prediction_path} labels scored pixels 255; a prediction needs a class")
        total += np.bincount(gt[valid].astype(np.int64) * n + prediction[valid].astype(np.int64),
                             minlength=n * n).reshape(n, n)
    return {
        "predictions": str(pred_dir),
        "ground_truth": str(gt_dir),
        "num_images": len(ids),
        "num_classes": num_classes,
        "class_names": names,
        "mean_over": mean_over,
        "manifest": {key: value for key, value in manifest.items() if key != "images"},
        **score_block(total, mean_over),
    }


#: what a folder data set's root names its class list (FolderDataModule's default)
ROOT_CLASS_LIST = "classes.txt"


def resolve_classes(given: int | None, folder: Path, manifest: dict[str, Any],
                    class_names: Sequence[str] | None, root: Path) -> tuple[int, list[str]]:
    """The foreground class count ``C`` of an evaluation, the same in every source that states one, and the
    ``C + 1`` class names of its report (background first).

    Sources: ``given`` (``--num-classes``), the producer's count in ``folder``'s manifest, ``class_names``
    (``C`` names, or ``C+1`` with background first; default ``<root>/classes.txt``, a folder data set's list).
    They must agree: a 4-class data set scored as 20 classes reports a table of VOC names over classes that do
    not exist. With no source, VOC's 20. Masks are checked image by image (a value above ``C`` is an error
    naming the file).
    """
    sources: dict[str, int] = {}
    if given is not None:
        sources["--num-classes"] = int(given)
    produced = producer_num_classes(manifest)
    if produced is not None:
        sources[f"{folder / 'manifest.json'} (its producer's)"] = produced
    names_source = "--class-names"
    listed = root / ROOT_CLASS_LIST
    if class_names is None and listed.is_file():
        class_names, names_source = read_class_list(listed), str(listed)
    if class_names is not None:
        names = list(class_names)
        sources[names_source] = len(names) - bool(names and names[0].lower() in ("background", "_background_"))
    if len(set(sources.values())) > 1:
        raise ValueError("the foreground class count differs between its sources: "
                         + ", ".join(f"{source} says {count}" for source, count in sources.items()))
    num_classes = next(iter(sources.values()), len(VOC_CLASSES))
    return num_classes, _class_names(class_names, num_classes)


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return _default_class_names(num_classes)
    names = list(class_names)
    if len(names) == num_classes:
        names = ["background", *names]
    if len(names) != num_classes + 1:
        raise ValueError(f"{len(names)} class names for {num_classes} classes (+ background)")
    return names


# --------------------------------------------------------------------------------------------------- reports


def percent(value: float | None) -> str:
    """A score in [0, 1] as a percentage with two decimals; ``n/a`` for None."""
    return "n/a" if value is None else f"{100 * value:.2f}"


def _other_mean_over(mean_over: str) -> str:
    return next(name for name in MEAN_OVER if name != mean_over)


def _block_summary(label: str, block: dict[str, Any], mean_over: str) -> str:
    """One report line: mIoU, the mIoU over the other class set when it differs, pixel and class accuracy."""
    other = _other_mean_over(mean_over)
    line = f"{label}: mIoU **{percent(block['miou'])} %**"
    if block.get(f"miou_{other}") is not None and not math.isclose(block[f"miou_{other}"], block["miou"] or 0.0,
                                                                   abs_tol=5e-5):
        line += f" (over the {MEAN_OVER[other]}: {percent(block[f'miou_{other}'])} %, `--mean-over {other}`)"
    return (line + f"; pixel accuracy {percent(block.get('pixel_accuracy'))} %, mean class accuracy "
            f"{percent(block.get('mean_class_accuracy'))} %")


def sweep_markdown(result: dict[str, Any]) -> str:
    mean_over = result.get("mean_over", "union")
    lines = [
        "# CAM evaluation",
        "",
        f"- CAMs: `{result['cams']}`",
        f"- ground truth: `{result['ground_truth']}`",
        f"- images: {result['num_images']} (dataset-level confusion, ground truth 255 ignored; mIoU = mean "
        f"over the {MEAN_OVER[mean_over]}, of {result['num_classes'] + 1} classes)",
    ]
    if result.get("note"):
        lines.append(f"- note: {result['note']}")
    names = result["class_names"]
    if result["thresholds"]:
        fixed, best = result["fixed"], result["best"]
        lines += [
            "- " + _block_summary(f"fixed threshold {fixed['threshold']:g}", fixed, mean_over),
            "- " + _block_summary(f"{best['chosen']} threshold {best['threshold']:g} (picked on the evaluation "
                                  "masks: optimistic)", best, mean_over),
            "",
            "## mIoU per threshold",
            "",
            "| threshold | mIoU (%) | |",
            "|---:|---:|---|",
        ]
        for tau, miou in zip(result["thresholds"], result["miou"]):
            marks = [label for label, block in (("fixed", fixed), ("oracle", best))
                     if math.isclose(tau, block["threshold"], rel_tol=0.0, abs_tol=1e-12)]
            lines.append(f"| {tau:g} | {percent(miou)} | {', '.join(marks)} |")
        if not fixed.get("in_sweep", True):
            lines.append(f"| {fixed['threshold']:g} | {percent(fixed['miou'])} | "
                         "fixed (outside the sweep) |")
        lines += [
            "",
            "## Per-class IoU (%)",
            "",
            f"| id | class | fixed ({fixed['threshold']:g}) | oracle ({best['threshold']:g}) |",
            "|---:|---|---:|---:|",
        ]
        for index, name in enumerate(names):
            lines.append(f"| {index} | {name} | {percent(fixed['iou'][index])} | "
                         f"{percent(best['iou'][index])} |")
        lines.append(f"| | **mIoU** | **{percent(fixed['miou'])}** | **{percent(best['miou'])}** |")
    if "bg_argmax" in result:
        block = result["bg_argmax"]
        lines += [
            "",
            f"## Files with their own background: {block['chosen']}",
            "",
            _block_summary(f"{block['num_images']} images", block, mean_over),
            "",
            "| id | class | IoU (%) | precision (%) | recall (%) |",
            "|---:|---|---:|---:|---:|",
        ]
        for index, name in enumerate(names):
            lines.append(f"| {index} | {name} | {percent(block['iou'][index])} | "
                         f"{percent(block['precision'][index])} | {percent(block['recall'][index])} |")
    return "\n".join(lines) + "\n"


def labels_markdown(result: dict[str, Any]) -> str:
    """The report of :func:`evaluate_label_folder`: headline line and the per-class table."""
    mean_over = result["mean_over"]
    lines = [
        "# Segmentation evaluation",
        "",
        f"- predictions: `{result['predictions']}`",
        f"- ground truth: `{result['ground_truth']}`",
        f"- images: {result['num_images']} (dataset-level confusion, ground truth 255 ignored; mIoU = mean over the "
        f"{MEAN_OVER[mean_over]}, of {result['num_classes'] + 1} classes)",
        "- " + _block_summary("argmax of the network's scores", result, mean_over),
        "",
        "| id | class | IoU (%) | precision (%) | recall (%) |",
        "|---:|---|---:|---:|---:|",
    ]
    for index, name in enumerate(result["class_names"]):
        lines.append(f"| {index} | {name} | {percent(result['iou'][index])} | "
                     f"{percent(result['precision'][index])} | {percent(result['recall'][index])} |")
    lines.append(f"| | **mIoU** | **{percent(result['miou'])}** | | |")
    return "\n".join(lines) + "\n"


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable with FreeType
    except (TypeError, OSError, ImportError):  # pragma: no cover - PIL without FreeType
        return ImageFont.load_default()


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """mIoU vs threshold with the fixed and oracle thresholds marked, drawn with PIL (matplotlib's import alone
    took longer than the whole sweep of 600 images)."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 720, 520, 70, 20, 96, 55  # the legend sits above the plot
    colours = {"sweep": (31, 119, 180), "fixed": (44, 160, 44), "best": (214, 39, 40), "axis": (60, 60, 60),
               "grid": (225, 225, 225)}
    pairs = sorted((t, 100 * m) for t, m in zip(result["thresholds"], result["miou"]) if m is not None)
    marks = [(result[key], key) for key in ("fixed", "best") if result.get(key) and result[key]["miou"] is not None]
    xs = [t for t, _ in pairs] + [block["threshold"] for block, _ in marks]
    ys = [m for _, m in pairs] + [100 * block["miou"] for block, _ in marks]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def point(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small, normal = _font(12), _font(14)
    for i in range(6):  # grid and tick labels
        x, y = x0 + i * (x1 - x0) / 5, y0 + i * (y1 - y0) / 5
        px, py = point(x, y)
        draw.line([(px, top), (px, height - bottom)], fill=colours["grid"])
        draw.line([(left, py), (width - right, py)], fill=colours["grid"])
        draw.text((px, height - bottom + 6), f"{x:.2f}", fill=colours["axis"], font=small, anchor="ma")
        draw.text((left - 6, py), f"{y:.1f}", fill=colours["axis"], font=small, anchor="rm")
    draw.rectangle([left, top, width - right, height - bottom], outline=colours["axis"])
    draw.text((width / 2, height - 18), "background threshold", fill=colours["axis"], font=normal, anchor="mm")
    draw.text((8, top - 20), "mIoU (%)", fill=colours["axis"], font=normal)
    draw.text((width / 2, 14), f"CAM mIoU, {result['num_images']} images", fill="black", font=normal, anchor="mm")
    if len(pairs) > 1:
        draw.line([point(x, y) for x, y in pairs], fill=colours["sweep"], width=2)
    for x, y in pairs:
        px, py = point(x, y)
        draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colours["sweep"])
    legend = [("sweep", colours["sweep"])]
    for block, key in marks:
        px, py = point(block["threshold"], 100 * block["miou"])
        for start in range(top, height - bottom, 8):  # dashed vertical line
            draw.line([(px, start), (px, min(start + 4, height - bottom))], fill=colours[key])
        draw.ellipse([px - 6, py - 6, px + 6, py + 6], outline=colours[key], width=3)
        legend.append((f"{block['chosen']}: {block['threshold']:g} -> {percent(block['miou'])} %", colours[key]))
    for row, (label, colour) in enumerate(legend):
        y = 36 + 18 * row
        draw.rectangle([left + 10, y - 4, left + 22, y + 4], fill=colour)
        draw.text((left + 28, y), label, fill="black", font=small, anchor="lm")
    image.save(path, format="PNG")


def _replace_atomically(path: Path, write: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_reports(result: dict[str, Any], out_json: str | Path) -> dict[str, Path | None]:
    """Write ``out_json``, a markdown summary beside it (``.md``) and the sweep curve (``.png``; not written
    when there is no sweep). Each file goes to a temporary name first and is moved into place."""
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1, allow_nan=False)
    _replace_atomically(out_json, lambda p: p.write_text(text + "\n"))
    markdown = out_json.with_suffix(".md")
    report = labels_markdown if "thresholds" not in result else sweep_markdown
    _replace_atomically(markdown, lambda p: p.write_text(report(result)))
    curve = None
    if result.get("thresholds"):
        curve = out_json.with_suffix(".png")
        _replace_atomically(curve, lambda p: plot_sweep(result, p))
    return {"json": out_json, "markdown": markdown, "curve": curve}


# --------------------------------------------------------------------------------------------------- CLI


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """What a results table reports from an :func:`evaluate_cam_folder` result.

    ``own``: the method's own rule, the plain argmax when every file carries its background (``own_rule``
    "argmax with its own bg"), else the fixed threshold ("tau = t"); ``best`` / ``best_rule``: the oracle
    threshold (None without a sweep); ``iou``: per-class IoU of the best threshold, else of the own rule;
    ``own_fg`` / ``gt_fg``: the share of scored pixels labelled foreground by the own rule / by the ground
    truth (None without a confusion matrix): over- or under-activation at a glance.
    """
    if result.get("mode") == "bg_argmax":
        own = result["bg_argmax"]
        scores = {"own": own["miou"], "own_rule": "argmax with its own bg", "best": None, "best_rule": None,
                  "iou": own["iou"]}
    else:
        own, best = result["fixed"], result["best"]
        scores = {"own": own["miou"], "own_rule": f"tau = {own['threshold']:g}", "best": best["miou"],
                  "best_rule": f"tau = {best['threshold']:g}", "iou": best["iou"]}
    scores["own_fg"] = scores["gt_fg"] = None
    if own.get("confusion") is not None:
        confusion = np.asarray(own["confusion"], dtype=np.float64)  # rows: ground truth, columns: prediction
        total = confusion.sum()
        if total > 0:
            scores["own_fg"], scores["gt_fg"] = confusion[:, 1:].sum() / total, confusion[1:].sum() / total
    return scores


def parse_thresholds(text: str) -> list[float]:
    """``start:stop:step`` (stop included when it lies on the grid within 1e-9) or ``a,b,c``.

    The grid is ``round(start + i * step, 10)`` for integer ``i``, so ``0.0:0.6:0.03`` gives 21 values
    ending exactly at 0.6 (no float accumulation).
    """
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3:
                raise ValueError("expected start:stop:step")
            start, stop, step = parts
            if not all(math.isfinite(p) for p in parts) or step <= 0 or stop < start:
                raise ValueError("need finite start <= stop and step > 0")
            quotient = (stop - start) / step
            steps = round(quotient)
            if abs(start + steps * step - stop) > 1e-9:
                steps = math.floor(quotient)
            values = [round(start + i * step, 10) for i in range(steps + 1)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError as error:
        raise ValueError(f"bad thresholds {text!r}: {error}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError(f"bad thresholds {text!r}: need at least one finite value")
    return values


NUM_CLASSES_HELP = ("foreground classes (default: the producer's, from the folder's manifest.json, else 20); "
                    "must agree with the manifest, --class-names and <root>/classes.txt")
CLASS_NAMES_HELP = "file with one foreground class name per line (a first line 'background' is skipped)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit-wsss eval-cam",
        description="Dataset-level CAM mIoU over a background-threshold sweep (protocol.md §5): reports the "
                    "fixed threshold and the oracle (best on these masks, optimistic) threshold.",
    )
    parser.add_argument("--cams", required=True, help="folder of <id>.npz CAM files")
    parser.add_argument("--root", required=True, help="VOC-layout root with SegmentationClass[Aug]/")
    parser.add_argument("--list", default="train",
                        help="split list: a path, or a name looked up in <root>/ImageSets/Segmentation "
                             "and <root> (IRN or SIPE line format; default: train)")
    parser.add_argument("--thresholds", default=DEFAULT_THRESHOLDS,
                        help="start:stop:step (stop inclusive) or a comma list (default 0.0:0.6:0.03)")
    parser.add_argument("--out", required=True, help="result JSON; .md and .png are written beside it")
    parser.add_argument("--num-classes", type=int, help=NUM_CLASSES_HELP)
    parser.add_argument("--class-names", help=CLASS_NAMES_HELP)
    parser.add_argument("--mask-dir",
                        help="ground-truth folder (default <root>/SegmentationClass, else ...Aug)")
    parser.add_argument("--fixed-threshold", type=float,
                        help="reported threshold (default: manifest bg_threshold, else "
                             f"{DEFAULT_BG_THRESHOLD})")
    parser.add_argument("--mean-over", choices=list(MEAN_OVER), default="union",
                        help="classes the mIoU averages over: " + "; ".join(f"{k}: {v}" for k, v in MEAN_OVER.items())
                        + " (default union; both are in the JSON)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def eval_cam(
    cams: str | Path,
    root: str | Path,
    list_name: str,
    out: str | Path,
    thresholds: str = DEFAULT_THRESHOLDS,
    num_classes: int | None = None,
    class_names: str | None = None,
    mask_dir: str | None = None,
    fixed_threshold: float | None = None,
    mean_over: str = "union",
    progress: bool = True,
) -> dict[str, Any]:
    """What ``lit-wsss eval-cam`` runs: :func:`evaluate_cam_folder` over the ids of a split list (a path, or a
    name under ``root``), thresholds as ``start:stop:step`` or a comma list, ``class_names`` a file; the reports
    (JSON, Markdown, PNG) are written next to ``out``. Returns the result with ``reports`` (the paths)."""
    root = Path(root)
    ids = read_id_list(resolve_list(root, list_name))
    names = read_class_list(class_names) if class_names else None
    result = evaluate_cam_folder(cams, root, ids, parse_thresholds(thresholds), num_classes=num_classes,
                                 mask_dir=mask_dir, fixed_threshold=fixed_threshold, class_names=names,
                                 progress=progress, mean_over=mean_over)
    paths = write_reports(result, out)
    return {**result, "reports": {kind: None if path is None else str(path) for kind, path in paths.items()}}


def main(argv: list[str] | None = None) -> int:
    """``lit-wsss eval-cam --cams DIR --root VOC_ROOT --list IDS.txt --thresholds 0.0:0.6:0.03 --out R.json``.

    Returns 0 on success, 1 when the evaluation fails (missing or malformed files; the message names them).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        parse_thresholds(args.thresholds)
    except ValueError as error:
        parser.error(str(error))
    if args.fixed_threshold is not None and not math.isfinite(args.fixed_threshold):
        parser.error(f"--fixed-threshold must be a finite number, got {args.fixed_threshold}")
    try:
        result = eval_cam(args.cams, args.root, args.list, args.out, args.thresholds, args.num_classes,
                          args.class_names, args.mask_dir, args.fixed_threshold, args.mean_over,
                          progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as error:
        print(f"eval-cam: error: {error}", file=sys.stderr)
        return 1
    if result["fixed"] is not None:
        fixed, best = result["fixed"], result["best"]
        print(f"fixed threshold {fixed['threshold']:g}: mIoU {percent(fixed['miou'])} % (over the "
              f"{MEAN_OVER[args.mean_over]}); pixel accuracy {percent(fixed['pixel_accuracy'])} %, "
              f"mean class accuracy {percent(fixed['mean_class_accuracy'])} %")
        print(f"oracle threshold {best['threshold']:g} (best on these masks, optimistic): "
              f"mIoU {percent(best['miou'])} %")
    if "bg_argmax" in result:
        block = result["bg_argmax"]
        print(f"bg argmax ({block['num_images']} files with their own background): "
              f"mIoU {percent(block['miou'])} %")
    if result.get("note"):
        print(f"note: {result['note']}")
    print("reports: " + ", ".join(p for p in result["reports"].values() if p is not None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
