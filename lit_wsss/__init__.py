"""lit_wsss: weakly supervised semantic segmentation from image-level labels, in PyTorch Lightning."""

__version__ = "0.1.0"
