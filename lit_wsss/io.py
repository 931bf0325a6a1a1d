"""Crash-safe, pickle-free, reproducible files: what every writer of lit_wsss uses."""

from __future__ import annotations

import contextlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

#: Fixed zip member time stamp: the same arrays always give the same bytes (np.savez stamps "now").
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
TMP_SUFFIX = ".tmp"
#: The label-map value that no loss and no metric counts (VOC's object boundaries, IR labels' unsure pixels).
IGNORE_INDEX = 255


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: a crash never leaves a half file.

    The temporary name (``.<name>.<pid>.tmp``) is unique per process, so concurrent writers never collide.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def palette_png_bytes(mask: np.ndarray) -> bytes:
    """A uint8 label map encoded as a palette PNG (mode "P") with the full 256-entry VOC colour map."""
    from PIL import Image

    image = Image.fromarray(np.asarray(mask, dtype=np.uint8))
    image.putpalette(voc_colormap().tobytes())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map: bit k of the index goes to bit 7 - k // 3 of channel k % 3. (n, 3) uint8."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, rgb = i, [0, 0, 0]
        for j in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - j)
            c >>= 3
        cmap[i] = rgb
    return cmap


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> None:
    """Write ``arrays`` as an uncompressed ``.npz`` under a temporary name, then rename into place.

    The archive is byte-for-byte reproducible (fixed member order and time stamps) and holds no pickles,
    so it reads back with ``np.load(path, allow_pickle=False)``. A crash leaves at most a ``*.tmp`` file.
    """
    content = io.BytesIO()
    with zipfile.ZipFile(content, mode="w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue())
    write_bytes_atomic(path, content.getvalue())


def npz_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays of an ``.npz`` read from the headers only (no array data is loaded)."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            with archive.open(name) as member:
                major, _ = np.lib.format.read_magic(member)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(member)
            shapes[name.removesuffix(".npy")] = tuple(shape)
    return shapes


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """JSON under a temporary name, then renamed into place."""
    write_bytes_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def read_manifest(folder: str | Path, what: str = "", required: bool = False) -> dict[str, Any]:
    """``<folder>/manifest.json`` of a producer stage (style.md P8).

    Returns ``{}`` for a folder without one unless ``required``, in which case the error names the file and
    the stage (``what``) that produces it. A file that is not a JSON object is an error naming it.
    """
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{what or 'manifest'}: {path} not found; run the stage that produces {folder} first")
        return {}
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read manifest {path}: {error}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest {path} is not a JSON object")
    return manifest
