"""The CAM file: its format, reader, writer and manifest, in one place (../shared/methods/protocol.md §12).

``<folder>/<id>.npz`` (uncompressed, no pickles, byte-reproducible: :func:`lit_wsss.io.save_npz_atomic`):

* ``keys`` int64 (K,): 0-based foreground class indices of the image's classes;
* ``high_res`` (K, H, W) in [0, 1] at the image size: float32 from a CAM method (``CAMWriter``), float16 for
  the walked scores that IRN writes beside its pseudo labels (``PseudoLabelWriter``); the manifest's
  ``high_res_rule`` says how it was sized (``padded`` = IRN, ``full`` = straight to the image size);
* ``cam`` float32 (K, ceil(H/4), ceil(W/4)): the stride-4 maps IRN's inference starts from (CAM files only);
* ``bg`` (H, W), optional: the own background of methods that predict one (SIPE), scored by an argmax over
  ``[bg, high_res]`` instead of a threshold.

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
#: The arrays of a CAM file, in the order they are written.
CAM_ARRAYS = ("keys", "high_res", "cam", "bg")
SUFFIX = ".npz"


def cam_path(folder: str | Path, image_id: str) -> Path:
    """``<folder>/<id>.npz``."""
    return Path(folder) / f"{image_id}{SUFFIX}"


def write_cam_file(path: str | Path, arrays: dict[str, np.ndarray], high_res_dtype: Any = np.float32) -> None:
    """One CAM file, atomically: ``keys`` as int64, ``high_res`` and ``bg`` as ``high_res_dtype``, ``cam``
    as float32; arrays not in :data:`CAM_ARRAYS` are refused (a misspelt name would be lost silently)."""
    unknown = sorted(set(arrays) - set(CAM_ARRAYS))
    if unknown or not {"keys", "high_res"} <= set(arrays):
        raise ValueError(f"CAM file {path}: arrays {sorted(arrays)}; expected keys, high_res and optionally "
                         f"cam, bg (unknown: {unknown})")
    dtypes = {"keys": np.int64, "high_res": high_res_dtype, "cam": np.float32, "bg": high_res_dtype}
    save_npz_atomic(path, **{name: np.asarray(arrays[name]).astype(dtypes[name], copy=False)
                             for name in CAM_ARRAYS if name in arrays})


def read_cam_file(path: str | Path, arrays: Sequence[str] = ("keys", "high_res", "bg")) -> dict[str, np.ndarray]:
    """The named arrays of one CAM file (``bg`` only where the file has it; the others are required).

    A missing, truncated or pickled file, or one without a required array, is a ``ValueError`` naming the file.
    """
    try:
        # our own handle: np.load leaks the one it opens when the archive is truncated
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            missing = [name for name in arrays if name != "bg" and name not in data.files]
            if missing:
                raise ValueError(f"missing array(s) {missing}; has {sorted(data.files)}")
            return {name: data[name] for name in arrays if name in data.files}
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
    """The manifest entry of one CAM file, from the array headers only: class count and image size."""
    shapes = npz_shapes(path)
    return {"num_classes": shapes["keys"][0], "size": list(shapes["high_res"][1:])}


def read_cam_manifest(folder: str | Path, required: bool = False) -> dict[str, Any]:
    """A CAM folder's manifest (``{}`` without one unless ``required``), its ``bg_threshold`` checked."""
    manifest = read_manifest(folder, "CAMs", required=required)
    threshold = manifest.get("bg_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise ValueError(f"CAM manifest {Path(folder) / 'manifest.json'}: bg_threshold must be a number or null, "
                         f"got {threshold!r}")
    return manifest
