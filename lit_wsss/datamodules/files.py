"""Readers of a data set's files: RGB images, masks, split lists, the ground-truth folder.

Kept apart from the DataModules (no albumentations, Lightning or torch here), so that the command-line tools
that only read files (``eval-cam``, ``ir-labels``, ``eval-seg``) import what they use.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lit_wsss.errors import DataFileError, ImageFileError, MissingDataError
from lit_wsss.io import IGNORE_INDEX


_JPEG_START, _JPEG_SCAN, _JPEG_END = b"\xff\xd8", b"\xff\xda", b"\xff\xd9"


def jpeg_is_truncated(data: bytes) -> bool:
    """A JPEG whose last scan has no end-of-image marker after it: the file was cut short.

    libjpeg (OpenCV, PIL with ``LOAD_TRUNCATED_IMAGES``) decodes such a file with a warning and fills the
    missing rows grey, so it would train silently. Entropy-coded data never holds ``FF D9`` (an ``FF`` byte is
    stuffed as ``FF 00``), so an end marker after the last start-of-scan marker means the data is complete;
    bytes after the end marker (camera padding) are allowed; a file cut inside its headers has no end marker.
    """
    if not data.startswith(_JPEG_START):
        return False
    end = data.rfind(_JPEG_END)
    return end < 0 or end < data.rfind(_JPEG_SCAN)


def read_rgb(path: Path) -> np.ndarray:
    """uint8 RGB image (grey images are expanded to 3 channels); a clear error for missing, corrupt or truncated
    files (:class:`~lit_wsss.errors.ImageFileError`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImageFileError(f"cannot read image {path}: {error.strerror or error}") from None
    if jpeg_is_truncated(data):
        raise ImageFileError(f"image {path} is a truncated JPEG ({len(data)} bytes, no end-of-image marker after "
                             "its last scan); copy or download it again")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if image is None:
        raise ImageFileError(f"cannot read image {path}: {'empty file' if not data else 'not a decodable image'}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_mask(path: Path, image_shape: tuple[int, int], num_classes: int) -> np.ndarray:
    """Segmentation ids of a palette/grey PNG, checked against the image size and the class range."""
    try:
        with Image.open(path) as png:
            if png.mode not in ("P", "L"):
                raise DataFileError(f"mask {path} has PIL mode {png.mode!r}, expected a palette ('P') or "
                                    "grey ('L') PNG")
            mask = np.array(png)
    except FileNotFoundError:
        raise MissingDataError(f"mask not found: {path}") from None
    if mask.shape != image_shape:
        raise DataFileError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                            f"{image_shape[1]}x{image_shape[0]} (width x height)")
    if mask.dtype == np.uint8:  # a histogram is ~10x faster than np.unique at VOC sizes
        present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    else:
        present = np.unique(mask)
    bad = np.setdiff1d(present, [*range(num_classes + 1), IGNORE_INDEX])
    if bad.size:
        raise DataFileError(f"mask {path} holds values {bad.tolist()}; expected 0..{num_classes} or "
                            f"{IGNORE_INDEX}")
    return mask


def image_id_of(name: str) -> str:
    """The id of an image named in a list or label file: the file name without its folder and, when it has one,
    its image or mask suffix (``/JPEGImages/2007_000032.jpg`` -> ``2007_000032``; ``b.c`` stays ``b.c``)."""
    path = Path(name.strip())
    return path.stem if path.suffix.lower() in {s.lower() for s in IMAGE_SUFFIXES} else path.name


def resolve_list(root: Path, name: str) -> Path:
    """A split list given as a path, or as a name looked up in ``ImageSets/Segmentation`` and the root."""
    candidates = [Path(name), root / "ImageSets" / "Segmentation" / f"{name}.txt", root / f"{name}.txt", root / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MissingDataError(f"split list {name!r} not found; looked for " + ", ".join(map(str, candidates)))


def read_id_list(path: Path) -> list[str]:
    """Image ids of a split list: IRN style (one id per line), SIPE/CPN style
    (``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``) or image file names: :func:`image_id_of` of the
    first token."""
    ids = [image_id_of(line.split()[0]) for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataFileError(f"split list {path} is empty")
    return ids


#: Ground-truth folders of a root, in the order they are tried: VOC's (protocol.md §1.1, §5), then ``masks`` of a
#: folder data set (:class:`~lit_wsss.datamodules.folder.FolderDataModule`).
GT_FOLDERS = ("SegmentationClass", "SegmentationClassAug", "masks")
#: Image folders of a root, in the order they are tried: VOC's, then a folder data set's.
IMAGE_FOLDERS = ("JPEGImages", "images")
#: Image file suffixes looked for when ``<id>.jpg`` is absent (an id is the file name without its suffix).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".JPG", ".JPEG", ".PNG")


def find_image_folder(root: Path, image_dir: str | Path | None = None) -> Path:
    """The image folder: ``image_dir`` (a path, or a name under ``root``), or the first of :data:`IMAGE_FOLDERS`
    under ``root``."""
    if image_dir is not None and str(image_dir) != "auto":
        candidates = [Path(image_dir), root / image_dir]
    else:
        candidates = [root / name for name in IMAGE_FOLDERS]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise MissingDataError(f"no image folder under {root}: expected "
                           + " or ".join(f"{c.name}/" for c in candidates))


def image_file(folder: Path, image_id: str, missing_ok: bool = False) -> Path:
    """``<folder>/<id>.jpg``, else ``<id>`` with another of :data:`IMAGE_SUFFIXES`; the error names what was tried
    (``missing_ok``: return the ``.jpg`` path instead, for a caller that reports every missing image at once)."""
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{image_id}{suffix}"
        if path.is_file():
            return path
    if missing_ok:
        return folder / f"{image_id}.jpg"
    raise MissingDataError(f"no image for id {image_id!r} in {folder} "
                           f"(looked for {image_id}{{{','.join(IMAGE_SUFFIXES)}}})")


def find_mask_folder(root: Path, mask_dir: str | Path | None = None) -> Path:
    """The ground-truth folder: ``mask_dir`` (a path, or a name under ``root``), or with ``None`` / ``"auto"``
    the first of :data:`GT_FOLDERS` that exists under ``root``."""
    if mask_dir is not None and str(mask_dir) != "auto":
        for candidate in (Path(mask_dir), root / mask_dir):
            if candidate.is_dir():
                return candidate
        raise MissingDataError(f"mask folder not found: {mask_dir} (also looked for {root / mask_dir})")
    for name in GT_FOLDERS:
        if (root / name).is_dir():
            return root / name
    raise MissingDataError(f"no {' or '.join(GT_FOLDERS)} folder under {root}")
