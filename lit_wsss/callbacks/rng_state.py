"""RNG states in checkpoints, so that a fit resumed from an end-of-epoch checkpoint draws what an
uninterrupted fit would have drawn.

Lightning 2.6 checkpoints hold weights, optimizer, schedulers and loop progress but no RNG state. A resumed
process is seeded afresh by ``seed_everything``, so its next training iterator draws the ``RandomSampler``
permutation and the DataLoader ``base_seed`` (which ``seed_worker`` turns into every worker's augmentation
seed) from the global torch RNG as it was at the start of training, i.e. it replays epoch 0's order and
augmentations. With ``num_workers=0`` the augmentations come from the generators inside the training
transform (albumentations keeps one numpy and one python generator per transform), which
``WSSSDataModule._loader`` reseeds whenever the loader is built.

:class:`RNGState` stores the global torch / CUDA / numpy / python states and the training transform's
generators, and restores them right after ``train_dataloader()`` returns in the resumed process: after the
loader's reseeding and immediately before Lightning creates the first iterator (inside
``trainer.estimated_stepping_batches`` or the fit loop's ``setup_data``). The sanity check runs under
``isolate_rng`` and does not disturb them.

A checkpoint taken in the middle of an epoch is not made exact: Lightning does not skip the batches already
seen for a loader without ``state_dict``, and that epoch's permutation was drawn from an earlier state.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader

_GENERATOR_ATTRS = ("random_generator", "py_random", "rng")


_Generator = np.random.Generator | random.Random


def _generators(obj: Any, path: str, seen: set[int]) -> Iterator[tuple[str, _Generator]]:
    """Every numpy / python generator of a transform, nested ``transforms`` lists and ``pipeline`` wrappers
    included (albumentations reseeds each child transform with its own generators)."""
    for name in _GENERATOR_ATTRS:
        gen = getattr(obj, name, None)
        if isinstance(gen, (np.random.Generator, random.Random)) and id(gen) not in seen:
            seen.add(id(gen))
            yield f"{path}.{name}", gen
    inner = getattr(obj, "pipeline", None)
    if inner is not None:
        yield from _generators(inner, f"{path}.pipeline", seen)
    children = getattr(obj, "transforms", None)
    if isinstance(children, (list, tuple)):
        for i, child in enumerate(children):
            yield from _generators(child, f"{path}.transforms[{i}]", seen)


def _loaders(obj: Any) -> Iterator[DataLoader]:
    if isinstance(obj, DataLoader):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _loaders(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _loaders(value)


def _transform_generators(loaders: Any) -> dict[str, _Generator]:
    found: dict[str, _Generator] = {}
    seen: set[int] = set()
    for i, loader in enumerate(_loaders(loaders)):
        transform = getattr(loader.dataset, "transform", None)
        if transform is not None:
            found.update(_generators(transform, f"loader{i}.transform", seen))
    return found


def _generator_state(gen: _Generator) -> Any:
    return gen.getstate() if isinstance(gen, random.Random) else gen.bit_generator.state


def _set_generator_state(gen: _Generator, state: Any) -> None:
    if isinstance(gen, random.Random):
        gen.setstate(state)
    else:
        gen.bit_generator.state = state


def _global_states() -> dict[str, Any]:
    # numpy's legacy state holds an ndarray, which weights_only checkpoint loading refuses: stored as a list
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_global_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    random.setstate(_as_tuples(states["python"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples; a checkpoint round trip may give lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class RNGState(Callback):
    """Saves the RNG states with every checkpoint and restores them when a fit resumes from one.

    Under DDP each rank's states are gathered into the checkpoint (rank ``r`` gets back entry ``r``): ranks
    seed their transforms differently (``seed_worker``). A resume with another world size keeps the fresh
    states and warns.
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._pending: dict[str, Any] | None = None
        self._wrapped: Any = None

    # --- saving -------------------------------------------------------------------------------------------
    def _local_states(self) -> dict[str, Any]:
        states = _global_states()
        loaders = self._trainer.train_dataloader if self._trainer is not None else None
        generators = _transform_generators(loaders)
        states["transforms"] = {path: _generator_state(gen) for path, gen in generators.items()}
        return states

    def state_dict(self) -> dict[str, Any]:
        local = self._local_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # save_checkpoint runs on every rank, so this collective is matched
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, local)
            return {"ranks": ranks}
        return {"ranks": [local]}

    # --- restoring ----------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return
        ranks = state_dict.get("ranks", [])
        if len(ranks) != trainer.world_size:
            rank_zero_warn(f"RNGState: the checkpoint holds {len(ranks)} rank(s), this run has "
                           f"{trainer.world_size}; RNG states are not restored")
            return
        self._pending = ranks[trainer.global_rank]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit":
            return
        # The first training iterator is created right after train_dataloader() returns, before any hook
        # (estimated_stepping_batches in configure_optimizers, or FitLoop.setup_data): restore in between.
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        original = getattr(source, "train_dataloader", None)
        if original is None or self._wrapped is not None:
            return

        @functools.wraps(original)
        def train_dataloader(*args: Any, **kwargs: Any) -> Any:
            loaders = original(*args, **kwargs)
            self._restore(loaders)
            return loaders

        source.train_dataloader = train_dataloader
        self._wrapped = source

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.train_dataloader is not None:  # built, but not by the wrapped train_dataloader
            self._late_restore(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._late_restore(trainer)  # e.g. loaders passed to fit(): its first iterator exists already

    def _late_restore(self, trainer: pl.Trainer) -> None:
        if self._pending is not None:
            rank_zero_warn("RNGState: restored after the training loader was built, not from its "
                           "train_dataloader(); the first resumed epoch may differ from an uninterrupted run")
            self._restore(trainer.train_dataloader)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            vars(self._wrapped).pop("train_dataloader", None)
            self._wrapped = None
        self._pending = None

    def _restore(self, loaders: Any) -> None:
        if self._pending is None:
            return
        states, self._pending = self._pending, None
        generators = _transform_generators(loaders)
        saved = states.get("transforms", {})
        if set(saved) != set(generators):
            rank_zero_warn("RNGState: the training transform's generators differ from the checkpoint's "
                           f"({sorted(saved)} vs {sorted(generators)}); restoring those that match")
        for path, state in saved.items():
            if path in generators:
                _set_generator_state(generators[path], state)
        _set_global_states(states)
