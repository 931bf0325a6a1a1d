"""Callbacks: prediction writers (CAMs, pseudo labels), validation media (W&B / PNG), RNG states in checkpoints,
the channels-last memory format."""

from lit_wsss.callbacks.cam_media import CAMMedia
from lit_wsss.callbacks.memory_format import ChannelsLast
from lit_wsss.callbacks.rng_state import RNGState
from lit_wsss.callbacks.writer import CAMWriter, PseudoLabelWriter, ResumableWriter, SegmentationWriter

__all__ = ["CAMMedia", "CAMWriter", "ChannelsLast", "PseudoLabelWriter", "RNGState", "ResumableWriter",
           "SegmentationWriter"]
