"""DataModules: VOC 2012, the built-in synthetic VOC-format set (COCO 2014 follows)."""

from lit_wsss.datamodules.base import WSSSDataModule
from lit_wsss.datamodules.synthetic import SyntheticVOCDataModule
from lit_wsss.datamodules.voc import VOCDataModule

__all__ = ["SyntheticVOCDataModule", "VOCDataModule", "WSSSDataModule"]
