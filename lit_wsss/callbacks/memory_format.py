"""``ChannelsLast``: the LightningModule in ``torch.channels_last`` memory format (issue 18).

Tensor cores (bf16 / fp16 convolutions on Ampere and later) want NHWC: cuDNN runs a channels-last convolution
without the NCHW <-> NHWC transposes it otherwise inserts around each one. Enable it on any stage with
``--trainer.callbacks+=lit_wsss.callbacks.ChannelsLast`` (with ``--trainer.precision bf16-mixed`` on a GPU).

What it changes and what it does not:

* every 4-D parameter and buffer (convolution weights) gets NHWC strides at ``setup``, before Lightning moves
  the module to its device (``Module.to(device)`` preserves strides) and before ``--ckpt_path`` is restored
  (``load_state_dict`` copies into the existing tensors, so their strides stay NHWC);
* a convolution with NHWC weights returns an NHWC output even for an NCHW input (PyTorch follows the weight's
  format), so the images need no conversion; the values are those of the NCHW network to float tolerance;
* checkpoints hold the same shapes and values: a plain NCHW module loads them (``load_state_dict`` copies the
  values into its own strides), and ``lit_wsss.checkpoints.read_weights_file`` reads them like any other.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback


class ChannelsLast(Callback):
    """Convert the LightningModule to ``torch.channels_last`` at ``setup`` (fit, validate, test and predict)."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)


__all__ = ["ChannelsLast"]
