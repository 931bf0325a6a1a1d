"""Image-level labels and class lists.

The official ``cls_labels.npy`` (IRN, SIPE, CPN) is a pickled dict saved with ``np.save``: the only pickle
lit_wsss ever reads. It is read once and converted to ``dict[str, float32 array]`` keyed by the VOC id
string (../shared/methods/protocol.md §1.3): IRN's file uses int keys (``2007_000032`` -> 2007000032),
SIPE's and CPN's use the string itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lit_wsss.io import save_npz_atomic

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


def decode_int_id(key: int) -> str:
    """IRN's ``decode_int_filename``: 2007000032 -> ``"2007_000032"``."""
    text = str(int(key))
    if len(text) != 10:
        raise ValueError(f"int image key {key} does not encode a VOC id YYYY_NNNNNN")
    return f"{text[:4]}_{text[4:]}"


def encode_int_id(image_id: str) -> int:
    """Inverse of :func:`decode_int_id`."""
    return int(image_id.replace("_", ""))


def load_cls_labels(path: str | Path, num_classes: int | None = None) -> dict[str, np.ndarray]:
    """Read an official ``cls_labels.npy`` (int or str keys) or our ``.npz`` (``ids``, ``labels``).

    Returns:
        ``{image_id: float32 multi-hot vector}``.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the content is not a dict of equal-length multi-hot vectors (message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image-level label file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            raw = dict(zip(data["ids"].tolist(), data["labels"]))
    else:
        # The official format is a pickled dict; this is the one place a pickle is accepted.
        loaded = np.load(path, allow_pickle=True)
        if loaded.dtype != object or loaded.shape != ():
            raise ValueError(f"{path}: expected a dict saved with np.save (official cls_labels.npy format)")
        raw = loaded.item()
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a dict of label vectors, found {type(raw).__name__}")
    labels: dict[str, np.ndarray] = {}
    for key, vector in raw.items():
        image_id = decode_int_id(key) if isinstance(key, (int, np.integer)) else str(key)
        vector = np.asarray(vector, dtype=np.float32).reshape(-1)
        if num_classes is not None and vector.shape[0] != num_classes:
            raise ValueError(f"{path}: label of {image_id!r} has {vector.shape[0]} entries, expected {num_classes}")
        if not np.isin(vector, (0.0, 1.0)).all():
            raise ValueError(f"{path}: label of {image_id!r} is not multi-hot 0/1: {vector}")
        labels[image_id] = vector
    return labels


def save_cls_labels_npz(labels: dict[str, np.ndarray], path: str | Path) -> None:
    """Write labels in lit_wsss's pickle-free format (``ids``: str array, ``labels``: (N, C) float32)."""
    ids = sorted(labels)
    save_npz_atomic(path, ids=np.array(ids), labels=np.stack([labels[i] for i in ids]).astype(np.float32))
