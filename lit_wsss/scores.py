"""Scores of confusion matrices and the one-pass background-threshold sweep of CAMs, in numpy only.

What ``lit-wsss eval-cam`` and ``eval-seg`` compute (:mod:`lit_wsss.evaluation`), kept free of torch so that the
tools start in a fraction of a second; :mod:`lit_wsss.metrics` wraps the sweep in a DDP-reduced torchmetrics
``Metric`` for validation. One confusion matrix over every pixel of every image (ground truth 255 ignored), IoU
per class, nan-mean over the classes of :data:`MEAN_OVER` (../shared/methods/protocol.md §5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from lit_wsss.io import IGNORE_INDEX

ORACLE_LABEL = "oracle (best on these masks)"
#: ``--mean-over``: the class set the mIoU averages over (lit_wsss.evaluation's docstring).
MEAN_OVER = {
    "union": "classes with a non-empty union of prediction and ground truth (IRN, chainercv)",
    "ground_truth": "classes present in the ground truth (VWE utils/pyutils.py)",
}
FIXED_LABEL = "fixed"
ARGMAX_LABEL = "argmax over [bg, high_res] (no threshold)"


# --------------------------------------------------------------------------------------------------- decoding


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, without importing torch
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _check_inputs(
    high_res: Any, keys: Any, gt: Any, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy views of one image's CAMs, keys and ground truth, with shapes and ranges checked."""
    cams = _as_numpy(high_res)
    keys = _as_numpy(keys).reshape(-1)
    gt = _as_numpy(gt)
    if cams.ndim != 3:
        raise ValueError(f"high_res must be (K, H, W), got shape {cams.shape}")
    if not np.issubdtype(cams.dtype, np.floating):
        raise ValueError(f"high_res must be floating point, got {cams.dtype}")
    if keys.shape != (cams.shape[0],):
        raise ValueError(f"keys has shape {keys.shape} but high_res has {cams.shape[0]} channels")
    if keys.size and not np.issubdtype(keys.dtype, np.integer):
        raise ValueError(f"keys must be integers, got {keys.dtype}")
    keys = keys.astype(np.int64)
    if keys.size and (keys.min() < 0 or keys.max() >= num_classes):
        raise ValueError(f"keys {keys.tolist()} outside 0..{num_classes - 1} (0-based foreground indices)")
    if gt.shape != cams.shape[1:]:
        raise ValueError(f"ground truth is {gt.shape} (H, W) but high_res is {cams.shape[1:]}")
    return cams, keys, gt


def _valid_ground_truth(gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat mask of counted pixels (gt != 255) and their int64 labels, range-checked."""
    flat = gt.reshape(-1)
    valid = flat != IGNORE_INDEX
    labels = flat[valid].astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > num_classes):
        bad = np.setdiff1d(np.unique(labels), np.arange(num_classes + 1))
        raise ValueError(
            f"ground truth holds values {bad.tolist()}; expected 0..{num_classes} or {IGNORE_INDEX}"
        )
    return valid, labels


def _max_argmax(cams: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per counted pixel: the max over channels and the index of its FIRST occurrence (torch/numpy argmax)."""
    if cams.shape[0] == 1:
        top = cams[0].reshape(-1)[valid]
        index = np.zeros(top.shape, np.int64)
    else:
        top = cams.max(0).reshape(-1)[valid]
        index = cams.argmax(0).reshape(-1)[valid]
    if np.isnan(top).any():
        raise ValueError("high_res contains NaN")
    return top, index


def sweep_confusions(
    high_res: Any, keys: Any, gt: Any, thresholds: Sequence[float] | np.ndarray, num_classes: int
) -> np.ndarray:
    """Confusion matrices of one image at every background threshold, in one pass over the pixels.

    Equal, integer for integer, to ``bincount(gt * (C+1) + cams_to_mask(high_res, keys, t))`` over the
    pixels with ``gt != 255``, for each ``t``. The CAM is compared with each threshold in the CAM's own dtype
    (float32 for the canonical files), as :func:`lit_wsss.cams.cams_to_mask` does, so ties and CAM values
    equal to a threshold decode the same way.

    Args:
        high_res: ``(K, H, W)`` CAMs (numpy or torch), ``K`` may be 0 (everything is background).
        keys: ``(K,)`` 0-based foreground class indices.
        gt: ``(H, W)`` ground truth, values ``0..num_classes`` or 255 (ignored).
        thresholds: background planes ``tau``; any order, duplicates allowed.
        num_classes: foreground classes ``C`` (VOC: 20).

    Returns:
        ``(T, C+1, C+1)`` int64 ``[threshold, ground truth, prediction]``, in the caller's threshold order.
    """
    cams, keys, gt = _check_inputs(high_res, keys, gt, num_classes)
    thr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if thr.size == 0:
        raise ValueError("no thresholds given")
    if not np.isfinite(thr).all():
        raise ValueError(f"thresholds must be finite, got {thr.tolist()}")
    count, n = thr.size, num_classes + 1
    valid, labels = _valid_ground_truth(gt, num_classes)
    out = np.zeros((count, n, n), np.int64)
    num_keys = cams.shape[0]
    if num_keys == 0:
        out[:, :, 0] = np.bincount(labels, minlength=n)
        return out
    top, index = _max_argmax(cams, valid)
    # Compare in the CAM dtype: cams_to_mask builds the background plane with high_res.new_full(tau).
    planes = thr.astype(cams.dtype)
    order = np.argsort(planes, kind="stable")
    # bucket b = number of (sorted) thresholds strictly below m: the pixel is foreground at sorted
    # thresholds j < b (t_j < m) and background at j >= b (m <= t_j, the plane wins ties).
    bucket = np.searchsorted(planes[order], top, side="left")
    joint = (labels * num_keys + index) * (count + 1) + bucket
    hist = np.bincount(joint, minlength=n * num_keys * (count + 1)).reshape(n, num_keys, count + 1)
    # foreground at sorted threshold j: pixels with bucket > j, a suffix sum over buckets
    foreground = np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]  # (n, K, T)
    background = (hist.sum(-1, keepdims=True) - foreground).sum(1)  # (n, T)
    ranked = np.zeros((count, n, n), np.int64)
    for k, key in enumerate(keys):  # a loop, not fancy indexing, so that repeated keys add up
        ranked[:, :, key + 1] += foreground[:, k, :].T
    ranked[:, :, 0] += background.T
    out[order] = ranked
    return out


def argmax_confusion(high_res: Any, keys: Any, gt: Any, bg: Any, num_classes: int) -> np.ndarray:
    """Confusion of one image whose method predicts its own background: ``argmax([bg, high_res_1..K])``
    mapped through ``(0, keys + 1)`` (ties go to the background, which comes first).

    Returns ``(C+1, C+1)`` int64 ``[ground truth, prediction]`` over the pixels with ``gt != 255``.
    """
    cams, keys, gt = _check_inputs(high_res, keys, gt, num_classes)
    bg = _as_numpy(bg)
    if not np.issubdtype(bg.dtype, np.floating):
        raise ValueError(f"bg must be floating point, got {bg.dtype}")
    if bg.shape != cams.shape[1:]:
        raise ValueError(f"bg is {bg.shape} but high_res is {cams.shape[1:]} (H, W)")
    n = num_classes + 1
    valid, labels = _valid_ground_truth(gt, num_classes)
    background = bg.reshape(-1)[valid]
    if np.isnan(background).any():
        raise ValueError("bg contains NaN")
    if cams.shape[0] == 0:
        pred = np.zeros(labels.shape, np.int64)
    else:
        top, index = _max_argmax(cams, valid)
        pred = np.where(background >= top, 0, keys[index] + 1)
    return np.bincount(labels * n + pred, minlength=n * n).reshape(n, n)


# --------------------------------------------------------------------------------------------------- metrics


def nan_to_none(values: np.ndarray) -> list:
    """Nested lists of floats with nan replaced by None (strict JSON has no NaN)."""
    if values.ndim == 0:
        value = float(values)
        return None if math.isnan(value) else value  # type: ignore[return-value]
    return [nan_to_none(v) for v in values]


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU of a confusion matrix ``C[ground_truth, prediction]`` (float64).

    ``IoU_c = C_cc / (sum_p C_cp + sum_g C_gc - C_cc)``; a class absent from both the ground truth and the
    prediction has IoU ``nan``, so that the nan-mean skips it (protocol.md §5).
    """
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, true_positive / np.maximum(union, 1), np.nan)


def _nan_mean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def confusion_scores(confusion: np.ndarray, mean_over: str = "union") -> dict[str, Any]:
    """Scores of one matrix ``C[ground truth, prediction]``: per-class IoU, precision (C_cc / column sum),
    recall (C_cc / row sum); mIoU over the ``mean_over`` class set (:data:`MEAN_OVER`) and over both sets;
    pixel accuracy (trace / total) and mean class accuracy (mean recall over classes in the ground truth)."""
    if mean_over not in MEAN_OVER:
        raise ValueError(f"mean_over must be one of {list(MEAN_OVER)}, got {mean_over!r}")
    iou = iou_per_class(confusion)
    miou_union = _nan_mean(iou)
    in_ground_truth = confusion.sum(1) > 0
    miou_ground_truth = _nan_mean(np.where(in_ground_truth, iou, np.nan))
    diagonal = confusion.diagonal().astype(np.float64)
    total = confusion.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(confusion.sum(0) > 0, diagonal / confusion.sum(0), np.nan)
        recall = np.where(in_ground_truth, diagonal / confusion.sum(1), np.nan)
    return {
        "miou": miou_union if mean_over == "union" else miou_ground_truth,
        "miou_union": miou_union,
        "miou_ground_truth": miou_ground_truth,
        "pixel_accuracy": float(diagonal.sum() / total) if total else float("nan"),
        "mean_class_accuracy": _nan_mean(recall),
        "iou": iou,
        "precision": precision,
        "recall": recall,
    }


_SCALARS = ("miou", "miou_union", "miou_ground_truth", "pixel_accuracy", "mean_class_accuracy")


def score_block(confusion: np.ndarray, mean_over: str = "union", **extra: Any) -> dict[str, Any]:
    scores = confusion_scores(confusion, mean_over)
    return {
        **extra,
        **{name: nan_to_none(np.float64(scores[name])) for name in _SCALARS},
        "iou": nan_to_none(scores["iou"]),
        "precision": nan_to_none(scores["precision"]),
        "recall": nan_to_none(scores["recall"]),
        "confusion": confusion.tolist(),
    }


def threshold_index(value: float, candidates: Sequence[float]) -> int | None:
    """Index of ``value`` among ``candidates`` (equal within 1e-12), else None."""
    for index, candidate in enumerate(candidates):
        if math.isclose(value, candidate, rel_tol=0.0, abs_tol=1e-12):
            return index
    return None


def sweep_summary(
    confusions: np.ndarray, thresholds: Sequence[float], fixed_threshold: float, mean_over: str = "union"
) -> dict[str, Any]:
    """Scores of a threshold sweep: per-threshold mIoU/IoU/precision/recall/accuracies, the oracle and the
    fixed threshold.

    Args:
        confusions: ``(T, C+1, C+1)`` matrices for ``thresholds``, plus one more (last) for ``fixed_threshold``
            when it is not among them.
        thresholds: the sweep.
        fixed_threshold: the method's default threshold (the headline number).
        mean_over: the class set of the mIoU (:data:`MEAN_OVER`); the oracle is the best by that mIoU.
    """
    sweep = list(thresholds)
    fixed_index = threshold_index(fixed_threshold, sweep)
    scores = [confusion_scores(matrix, mean_over) for matrix in confusions[: len(sweep)]]
    miou = np.array([s["miou"] for s in scores])
    best = int(np.nanargmax(miou)) if not np.isnan(miou).all() else 0  # first best: lowest such tau
    fixed_matrix = confusions[fixed_index if fixed_index is not None else len(sweep)]
    summary = {
        "thresholds": sweep,
        "mean_over": mean_over,
        "miou": nan_to_none(miou),
        "pixel_accuracy": nan_to_none(np.array([s["pixel_accuracy"] for s in scores])),
        "mean_class_accuracy": nan_to_none(np.array([s["mean_class_accuracy"] for s in scores])),
        "iou": [nan_to_none(s["iou"]) for s in scores],
        "precision": [nan_to_none(s["precision"]) for s in scores],
        "recall": [nan_to_none(s["recall"]) for s in scores],
        "confusion": np.asarray(confusions[: len(sweep)]).tolist(),
        "best": score_block(confusions[best], mean_over, threshold=sweep[best], chosen=ORACLE_LABEL),
        "fixed": score_block(fixed_matrix, mean_over, threshold=fixed_threshold, chosen=FIXED_LABEL,
                        in_sweep=fixed_index is not None),
    }
    del summary["best"]["confusion"]  # the same as confusion[best]
    return summary
