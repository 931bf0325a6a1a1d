"""Callbacks: prediction writers (CAMs, pseudo labels) and validation media (W&B / PNG)."""

from lit_wsss.callbacks.cam_media import CAMMedia
from lit_wsss.callbacks.writer import CAMWriter, PseudoLabelWriter, ResumableWriter, SegmentationWriter

__all__ = ["CAMMedia", "CAMWriter", "PseudoLabelWriter", "ResumableWriter", "SegmentationWriter"]
