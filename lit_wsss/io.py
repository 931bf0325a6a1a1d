"""Crash-safe, pickle-free, reproducible files: what every writer of lit_wsss uses."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

#: Fixed zip member time stamp: the same arrays always give the same bytes (np.savez stamps "now").
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
TMP_SUFFIX = ".tmp"
#: the lock file of a folder some process is writing (:func:`acquire_folder_lock`)
LOCK_FILE = ".lock"
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


def producer_num_classes(manifest: dict[str, Any]) -> int | None:
    """The foreground class count of the model that produced a folder (a writer's manifest: its data set's
    ``protocol.data.num_classes``, else the model's ``hparams.num_classes``); ``None`` when it states none."""
    data = (manifest.get("protocol") or {}).get("data") or {}
    count = data.get("num_classes", (manifest.get("hparams") or {}).get("num_classes"))
    return None if count is None else int(count)


#: locks this process holds: lock path -> open file (the kernel lock lives as long as the file is open)
_HELD_LOCKS: dict[Path, Any] = {}


def acquire_folder_lock(folder: str | Path, what: str) -> Path:
    """Claim ``folder`` for this process with an exclusive ``flock`` on ``<folder>/.lock``.

    Two writers in one folder would each delete the other's temporary files as leftovers of a killed run and
    write a manifest of half the ids. The kernel drops the lock when its process ends, ``kill -9`` included, so
    a killed run never blocks its rerun. The file names the holder (pid, host, start, command) for the
    :class:`~lit_wsss.errors.FolderInUseError` the second process gets; ``what`` names the output there.
    """
    import fcntl

    from lit_wsss.errors import FolderInUseError

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = (folder / LOCK_FILE).resolve()
    if lock in _HELD_LOCKS:
        return lock
    while True:
        handle = open(lock, "a+")  # noqa: SIM115 - kept open while the lock is held
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read()
            handle.close()
            try:
                holder = json.loads(text)
            except ValueError:
                holder = {}
            raise FolderInUseError(
                f"{what} folder {folder} is being written by another process (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')} since {holder.get('started', '?')}: {holder.get('command', '?')}); "
                "wait for it to finish") from None
        try:  # the holder before us may have removed the file between our open and our lock: lock it again
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "command": " ".join(sys.argv)}, handle)
    handle.flush()
    _HELD_LOCKS[lock] = handle
    return lock


def release_folder_lock(folder: str | Path) -> None:
    """Remove ``<folder>/.lock`` and drop its lock, if this process holds it."""
    lock = (Path(folder) / LOCK_FILE).resolve()
    handle = _HELD_LOCKS.pop(lock, None)
    if handle is not None:
        lock.unlink(missing_ok=True)  # before closing: a process waiting on this file then sees it gone
        handle.close()


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[Path]:
    """:func:`acquire_folder_lock` for the duration of a ``with`` block."""
    lock = acquire_folder_lock(folder, what)
    try:
        yield lock
    finally:
        release_folder_lock(folder)
