"""DataModules: VOC 2012, MS COCO 2014 and the built-in synthetic VOC-format set."""

from lit_wsss.datamodules.base import WSSSDataModule
from lit_wsss.datamodules.coco import COCODataModule
from lit_wsss.datamodules.irn import IRNDataModule
from lit_wsss.datamodules.synthetic import SyntheticVOCDataModule
from lit_wsss.datamodules.voc import VOCDataModule

__all__ = ["COCODataModule", "IRNDataModule", "SyntheticVOCDataModule", "VOCDataModule", "WSSSDataModule"]
