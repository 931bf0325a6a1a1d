"""Callbacks: CAM writer (predict), W&B media and tables."""

from lit_wsss.callbacks.cam_media import CAMMedia
from lit_wsss.callbacks.cam_writer import CAMWriter

__all__ = ["CAMMedia", "CAMWriter"]
