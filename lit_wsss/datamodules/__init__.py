"""DataModules: VOC 2012, MS COCO 2014, a folder data set of the user's own and the built-in synthetic VOC-format set.

The classes are imported on first use (PEP 562), so that ``lit_wsss.datamodules.files`` and ``.labels`` (plain
readers) can be imported by the command-line tools without Lightning and albumentations.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "COCODataModule": "coco",
    "FolderDataModule": "folder",
    "IRNDataModule": "irn",
    "SyntheticVOCDataModule": "synthetic",
    "VOCDataModule": "voc",
    "WSSSDataModule": "base",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])
