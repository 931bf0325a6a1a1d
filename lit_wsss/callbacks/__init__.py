"""Callbacks: prediction writers (CAMs, pseudo labels), validation media (W&B / PNG), RNG states in checkpoints."""

from lit_wsss.callbacks.cam_media import CAMMedia
from lit_wsss.callbacks.rng_state import RNGState
from lit_wsss.callbacks.writer import CAMWriter, PseudoLabelWriter, ResumableWriter, SegmentationWriter

__all__ = ["CAMMedia", "CAMWriter", "PseudoLabelWriter", "RNGState", "ResumableWriter", "SegmentationWriter"]
