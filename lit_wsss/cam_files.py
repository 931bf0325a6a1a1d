"""The CAM file: its format, reader, writer and manifest, in one place (../shared/methods/protocol.md §12).

``<folder>/<id>.npz`` (uncompressed, no pickles, byte-reproducible: :func:`lit_wsss.io.save_npz_atomic`):

* ``keys`` int64 (K,): 0-based foreground class indices of the image's classes;
* ``high_res`` (K, H, W) in [0, 1] at the image size: float32 from a CAM method (``CAMWriter``), float16 for
  the walked scores that IRN writes beside its pseudo labels (``PseudoLabelWriter``); the manifest's
  ``high_res_rule`` says how it was sized (``padded`` = IRN, ``full`` = straight to the image size);
* ``cam`` float32 (K, ceil(H/4), ceil(W/4)): the stride-4 maps IRN's inference starts from (CAM files only);
* ``bg`` (H, W), optional: the own background of methods that predict one (SIPE), scored by an argmax over
  ``[bg, high_res]`` instead of a threshold.

Compact files (issue 18; ``CAMWriter(dtype="float16", store_high_res=False)``, recorded in the manifest's
``storage``): ``high_res``, ``cam`` and ``bg`` may be float16, and ``high_res`` may be left out. A file without it
holds ``size`` int64 (2,) = (H, W) and ``high_res_rule`` (a string, shape (1,)), and :func:`read_cam_file` returns
``high_res`` upsampled from ``cam`` by :func:`high_res_from_cam`. IRNet reads only ``cam`` (protocol.md §6.5), so
its pseudo labels do not change; eval-cam and ir-labels see the upsampled maps (docs/benchmarks.md, "Compact CAM
files", for the measured change). Every reader returns float32.

``<folder>/manifest.json`` (written by the writer's rank 0) lists the ids and may give the producer's fixed
background threshold as ``bg_threshold`` (a number or null). Every reader here opens files with
``allow_pickle=False`` and names the file in its errors.

This module imports numpy only, so the command-line tools that read CAM files stay light.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lit_wsss.io import npz_shapes, read_manifest, save_npz_atomic

#: IRN's ``cam_eval_thres`` (protocol.md §5): the background threshold a CAM file is decoded with unless its
#: manifest records another (here, not in :mod:`lit_wsss.cams`, so that ``eval-cam`` needs no torch).
DEFAULT_BG_THRESHOLD = 0.15
#: The arrays of a CAM file, in the order they are written (``size`` and ``high_res_rule``: compact files only).
CAM_ARRAYS = ("keys", "high_res", "cam", "bg", "size", "high_res_rule")
#: The dtypes a CAM file may store its maps in.
CAM_DTYPES = {"float32": np.float32, "float16": np.float16}
SUFFIX = ".npz"


def cam_path(folder: str | Path, image_id: str) -> Path:
    """``<folder>/<id>.npz``."""
    return Path(folder) / f"{image_id}{SUFFIX}"


def write_cam_file(path: str | Path, arrays: dict[str, np.ndarray], high_res_dtype: Any = np.float32,
                   cam_dtype: Any = np.float32, high_res_rule: str | None = None) -> None:
    """One CAM file, atomically: ``keys`` as int64, ``high_res`` and ``bg`` as ``high_res_dtype``, ``cam`` as
    ``cam_dtype``; arrays not in :data:`CAM_ARRAYS` are refused (a misspelt name would be lost silently).

    ``high_res_rule`` (``padded`` / ``full``) writes a compact file: ``high_res`` is replaced by its size and the
    rule :func:`high_res_from_cam` upsamples ``cam`` with.
    """
    unknown = sorted(set(arrays) - set(CAM_ARRAYS[:4]))
    if unknown or not {"keys", "high_res"} <= set(arrays):
        raise ValueError(f"CAM file {path}: arrays {sorted(arrays)}; expected keys, high_res and optionally "
                         f"cam, bg (unknown: {unknown})")
    dtypes = {"keys": np.int64, "high_res": high_res_dtype, "cam": cam_dtype, "bg": high_res_dtype}
    out = {name: np.asarray(arrays[name]).astype(dtypes[name], copy=False) for name in CAM_ARRAYS[:4] if name in arrays}
    if high_res_rule is not None:
        if high_res_rule not in UPSAMPLE_RULES or "cam" not in out:
            raise ValueError(f"CAM file {path}: a file without high_res needs cam and a rule in "
                             f"{list(UPSAMPLE_RULES)}, got rule {high_res_rule!r} and arrays {sorted(arrays)}")
        out["size"] = np.asarray(out.pop("high_res").shape[1:], np.int64)
        out["high_res_rule"] = np.asarray(high_res_rule)
    save_npz_atomic(path, **out)


#: How :func:`high_res_from_cam` upsamples a stride-4 ``cam`` to ``H x W``, by the producer's ``high_res_rule``, as
#: the producer sized ``high_res`` from the same network maps (protocol.md §4): ``padded`` to the 16-multiple canvas,
#: then cropped; ``full`` straight to ``H x W``. Bilinear, ``align_corners=False`` (torch's half-pixel convention).
#: (A plain x4 of ``cam``, as IRN upsamples its walked maps, is misaligned with that canvas: 10x the error on real
#: CAMs, measured by a helper on voc12-mini: mean |difference| 0.024 against 0.0023.)
UPSAMPLE_RULES = ("padded", "full")


def _bilinear_axis(values: np.ndarray, out_size: int, ratio: float, axis: int) -> np.ndarray:
    """torch's ``upsample_bilinear2d`` along one axis: source ``(i + 0.5) * ratio - 0.5``, clamped at 0."""
    in_size = values.shape[axis]
    source = np.maximum((np.arange(out_size, dtype=np.float32) + 0.5) * np.float32(ratio) - 0.5, 0)
    low = source.astype(np.int64)
    high = np.minimum(low + 1, in_size - 1)
    weight = (source - low).astype(np.float32)
    shape = [1] * values.ndim
    shape[axis] = out_size
    weight = weight.reshape(shape)
    return np.take(values, low, axis=axis) * (1 - weight) + np.take(values, high, axis=axis) * weight


def high_res_from_cam(cam: np.ndarray, size: Sequence[int], rule: str) -> np.ndarray:
    """``(K, H, W)`` float32 from a stride-4 ``(K, ceil(H/4), ceil(W/4))`` map by ``rule`` (:data:`UPSAMPLE_RULES`),
    not renormalised (methods differ in their normalisation: GSLM's WAM maps are absolute, cls.md P2).

    Equals ``F.interpolate(cam[None], size, mode="bilinear", align_corners=False)`` (``size`` the padded canvas,
    then cropped, for ``padded``) up to float32 rounding, in numpy so that eval-cam needs no torch.
    """
    if rule not in UPSAMPLE_RULES:
        raise ValueError(f"high_res_rule must be one of {list(UPSAMPLE_RULES)}, got {rule!r}")
    cam = np.asarray(cam, np.float32)
    height, width = (int(v) for v in size)
    rows, cols = cam.shape[1:]
    out_h, out_w = (16 * -(-height // 16), 16 * -(-width // 16)) if rule == "padded" else (height, width)
    out = _bilinear_axis(_bilinear_axis(cam, out_h, rows / out_h, 1), out_w, cols / out_w, 2)
    return np.ascontiguousarray(out[:, :height, :width])


def read_cam_file(path: str | Path, arrays: Sequence[str] = ("keys", "high_res", "bg")) -> dict[str, np.ndarray]:
    """The named arrays of one CAM file (``bg`` only where the file has it; the others are required).

    A compact file's ``high_res`` is upsampled from its ``cam`` (:func:`high_res_from_cam`); float16 maps are
    returned as float32. A missing, truncated or pickled file, or one without a required array, is a
    ``ValueError`` naming the file.
    """
    try:
        # our own handle: np.load leaks the one it opens when the archive is truncated
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            # a compact file (it has ``size``) derives high_res; any other file without it is just incomplete
            derived = "high_res" in arrays and "high_res" not in data.files and "size" in data.files
            needed = {*arrays, "cam", "size", "high_res_rule"} - {"high_res"} if derived else set(arrays)
            missing = sorted(name for name in needed if name != "bg" and name not in data.files)
            if missing:
                raise ValueError(f"missing array(s) {missing}; has {sorted(data.files)}")
            read = {name: data[name] for name in needed if name in data.files}
        if derived:
            rule = str(read["high_res_rule"].reshape(-1)[0])  # written 1-d: np.ascontiguousarray is at least 1-d
            read["high_res"] = high_res_from_cam(read["cam"], read["size"], rule)
        return {name: value.astype(np.float32) if value.dtype == np.float16 else value
                for name, value in read.items() if name in arrays}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        reason = str(error)
        if reason.startswith("Object arrays cannot be loaded"):
            reason = "it holds pickled object arrays, which lit_wsss never loads (allow_pickle=False)"
        elif "allow_pickle" in reason:  # numpy's guess for any file that is not an .npy/.npz archive
            reason = "not an .npz archive (damaged, or not written by lit_wsss)"
        raise ValueError(f"cannot read CAM file {path}: {reason}") from None


def load_cam_file(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``keys``, ``high_res`` and (optional) ``bg`` of one CAM file; ``cam`` is not read."""
    arrays = read_cam_file(path)
    return arrays["keys"], arrays["high_res"], arrays.get("bg")


def cam_file_info(path: str | Path) -> dict[str, Any]:
    """The manifest entry of one CAM file, from the array headers (and a compact file's ``size``): class count
    and image size."""
    shapes = npz_shapes(path)
    if "high_res" in shapes:
        size = list(shapes["high_res"][1:])
    else:
        size = [int(v) for v in read_cam_file(path, ("size",))["size"]]
    return {"num_classes": shapes["keys"][0], "size": size}


def read_cam_manifest(folder: str | Path, required: bool = False) -> dict[str, Any]:
    """A CAM folder's manifest (``{}`` without one unless ``required``), its ``bg_threshold`` checked."""
    manifest = read_manifest(folder, "CAMs", required=required)
    threshold = manifest.get("bg_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise ValueError(f"CAM manifest {Path(folder) / 'manifest.json'}: bg_threshold must be a number or null, "
                         f"got {threshold!r}")
    return manifest
