"""``ChannelsLast``: run a module in the ``torch.channels_last`` memory format (issue 18, GPU readiness).

On a GPU, convolutions in NHWC use the tensor cores of bf16/fp16 without layout conversions (often 1.1-1.3x for
ResNets under ``precision: bf16-mixed``); on a CPU it is rarely faster (docs/benchmarks.md). A convolution whose
weight is channels_last returns channels_last, so converting the module is enough: inputs need not change. The
format is a stride order only: values, the state dict's keys and shapes, and checkpoints are the same, and a
checkpoint written from a channels_last module loads into a contiguous one.

    lit-wsss fit ... --trainer.callbacks+=lit_wsss.callbacks.ChannelsLast
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch


class ChannelsLast(pl.Callback):
    """Converts the LightningModule's 4-d parameters and buffers to ``torch.channels_last`` at setup."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)
