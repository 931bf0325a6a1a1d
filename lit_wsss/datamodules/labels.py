"""Image-level labels and class lists.

lit_wsss's own label format is JSON: ``{"<image id>": ["cat", "person"], ...}`` (class names of the data set's
class list) or index lists ``{"<image id>": [7, 14]}`` (0-based foreground class indices); ``[]`` is an image
without foreground. A CSV with the columns ``image`` and ``labels`` (names separated by ``;``) is read the same
way; ``image`` may be a file name (``lit_wsss.datamodules.files.image_id_of``). Our older ``.npz`` (``ids``, ``labels``) stays readable.

The official ``cls_labels.npy`` (IRN, SIPE, CPN) is a pickled dict saved with ``np.save``: the only pickle
lit_wsss ever reads, in :func:`read_official_cls_labels` alone; ``lit-wsss prepare labels`` converts it to JSON
once. Keys (../shared/methods/protocol.md §1.3): IRN's file uses int keys (``2007_000032`` -> 2007000032),
SIPE's and CPN's the id string itself.
"""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from lit_wsss.datamodules.files import image_id_of
from lit_wsss.errors import DataFileError, MissingDataError
from lit_wsss.io import save_npz_atomic, write_bytes_atomic

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def decode_int_id(key: int) -> str:
    """IRN's ``decode_int_filename``: 2007000032 -> ``"2007_000032"``."""
    text = str(int(key))
    if len(text) != 10:
        raise DataFileError(f"int image key {key} does not encode a VOC id YYYY_NNNNNN")
    return f"{text[:4]}_{text[4:]}"


def encode_int_id(image_id: str) -> int:
    """Inverse of :func:`decode_int_id`."""
    return int(image_id.replace("_", ""))


#: Label file formats by suffix (:func:`load_cls_labels`).
LABEL_FORMATS = (".json", ".csv", ".npz", ".npy")


def read_official_cls_labels(path: Path) -> dict[Any, Any]:
    """The raw dict of an official ``cls_labels.npy``: the one place lit_wsss unpickles anything."""
    try:
        loaded = np.load(path, allow_pickle=True)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as error:
        raise DataFileError(f"{path}: not an official cls_labels.npy (a dict saved with np.save): "
                            f"{type(error).__name__}: {error}") from None
    if loaded.dtype != object or loaded.shape != ():
        raise DataFileError(f"{path}: expected a dict saved with np.save (official cls_labels.npy format)")
    raw = loaded.item()
    if not isinstance(raw, dict):
        raise DataFileError(f"{path}: expected a dict of label vectors, found {type(raw).__name__}")
    return raw


def read_class_list(path: str | Path) -> tuple[str, ...]:
    """Foreground class names, one per line, in label-index order (mask value = index + 1).

    A first line ``background`` (or ``_background_``) is dropped: masks always use 0 for it.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"class list not found: {path} (one foreground class name per line)")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if names and names[0].lower() in ("background", "_background_"):
        names = names[1:]
    if not names:
        raise DataFileError(f"class list {path} names no foreground class")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataFileError(f"class list {path} repeats {repeated}")
    return tuple(names)


def multi_hot(classes: list[Any], class_names: tuple[str, ...] | None, num_classes: int | None,
              where: str) -> np.ndarray:
    """float32 multi-hot of a list of class names or 0-based indices."""
    size = len(class_names) if class_names is not None else num_classes
    if size is None:
        raise DataFileError(f"{where}: a list of classes needs the class list (or num_classes) to build "
                            "vectors")
    vector = np.zeros(size, dtype=np.float32)
    for entry in classes:
        if isinstance(entry, str) and not entry.strip().lstrip("-").isdigit():
            if class_names is None:
                raise DataFileError(f"{where}: class name {entry!r} needs a class list "
                                    "(data.init_args.classes)")
            if entry not in class_names:
                raise DataFileError(f"{where}: unknown class {entry!r}; the class list has "
                                    f"{list(class_names)}")
            vector[class_names.index(entry)] = 1.0
        else:
            index = int(entry)
            if not 0 <= index < size:
                raise DataFileError(f"{where}: class index {index} outside 0..{size - 1}")
            vector[index] = 1.0
    return vector


def _read_json_labels(path: Path, class_names, num_classes) -> dict[str, np.ndarray]:
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataFileError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise DataFileError(f"{path}: expected {{\"<image id>\": [class names or indices], ...}}")
    return {str(k): multi_hot(v, class_names, num_classes, f"{path}: image {k!r}") for k, v in raw.items()}


def _read_csv_labels(path: Path, class_names, num_classes) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        fields = rows[0].keys() if rows else []
    if "labels" not in fields or not ({"image", "image_id"} & set(fields)):
        raise DataFileError(f"{path}: expected a header with the columns 'image' (or 'image_id') and "
                            f"'labels' (class names separated by ';'), found {list(fields)}")
    labels: dict[str, np.ndarray] = {}
    for line, row in enumerate(rows, start=2):
        image_id = image_id_of(row.get("image") or row.get("image_id") or "")
        if not image_id:
            raise DataFileError(f"{path}: line {line} has no image")
        if image_id in labels:
            raise DataFileError(f"{path}: line {line} repeats image {image_id!r}")
        names = [n.strip() for n in (row["labels"] or "").split(";") if n.strip()]
        labels[image_id] = multi_hot(names, class_names, num_classes, f"{path}: line {line}")
    return labels


def load_cls_labels(path: str | Path, num_classes: int | None = None,
                    class_names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Read image-level labels: our JSON or CSV (module doc), our ``.npz`` (``ids``, ``labels``) or an
    official ``cls_labels.npy`` (int or str keys).

    Args:
        num_classes: expected vector length (checked).
        class_names: the class list, needed to read class names in JSON / CSV.

    Returns:
        ``{image_id: float32 multi-hot vector}``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: an unknown format, or content that is not equal-length multi-hot vectors (the message
            names the file and the image).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingDataError(f"image-level label file not found: {path}")
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    if path.suffix == ".json":
        raw: dict[Any, Any] = _read_json_labels(path, class_names, num_classes)
    elif path.suffix == ".csv":
        raw = _read_csv_labels(path, class_names, num_classes)
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            raw = dict(zip(data["ids"].tolist(), data["labels"]))
    elif path.suffix == ".npy":
        raw = read_official_cls_labels(path)
    else:
        raise DataFileError(f"{path}: unknown label format {path.suffix!r}; expected one of {LABEL_FORMATS}")
    labels: dict[str, np.ndarray] = {}
    for key, vector in raw.items():
        image_id = decode_int_id(key) if isinstance(key, (int, np.integer)) else str(key)
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if num_classes is not None and vector.shape[0] != num_classes:
            raise DataFileError(f"{path}: label of {image_id!r} has {vector.shape[0]} entries, expected "
                                f"{num_classes}")
        if not np.isin(vector, (0.0, 1.0)).all():
            raise DataFileError(f"{path}: label of {image_id!r} is not multi-hot 0/1: {vector}")
        labels[image_id] = vector
    return labels


def save_labels_json(labels: dict[str, np.ndarray], path: str | Path,
                     class_names: tuple[str, ...] | None = None) -> None:
    """Write labels in lit_wsss's JSON format (class names when ``class_names`` is given, else indices),
    under a temporary name then renamed."""
    payload = {}
    for image_id in sorted(labels):
        indices = np.flatnonzero(labels[image_id]).tolist()
        payload[image_id] = [class_names[i] for i in indices] if class_names is not None else indices
    write_bytes_atomic(path, json.dumps(payload, indent=0).encode())


def save_cls_labels_npz(labels: dict[str, np.ndarray], path: str | Path) -> None:
    """Write labels in lit_wsss's pickle-free format (``ids``: str array, ``labels``: (N, C) float32)."""
    ids = sorted(labels)
    save_npz_atomic(path, ids=np.array(ids), labels=np.stack([labels[i] for i in ids]).astype(np.float32))
