"""Reading weights people already have: official IRN checkpoints, lit_wsss checkpoints, plain state dicts.

Every file is read with ``torch.load(..., weights_only=True)``: no pickled code is ever executed.

Official IRN layout (``jiwoon-ahn/irn`` ``net/resnet50_cam.py``, saved by ``step/train_cam.py`` as
``res50_cam.pth``): the ResNet-50 is an attribute ``resnet50`` and its parts are registered a second time
as ``stage1`` ... ``stage4``, so every backbone tensor appears twice, e.g. ``resnet50.layer1.0.conv1.weight``
and ``stage1.4.0.conv1.weight``; the classifier is ``classifier.weight`` (20 x 2048 x 1 x 1). lit_wsss keeps
torchvision's names under ``backbone.``, so the conversion is a prefix swap plus dropping the aliases.

Official CPN layout (``Ferenas/CPN`` ``network/resnet38_CPN.py`` ``Net``, saved with
``torch.save(model.state_dict())``, possibly from ``nn.DataParallel`` with a ``module.`` prefix): the
ResNet-38 is not a submodule but the Net itself, so its keys are top level (``conv1a.weight``,
``b2.bn_branch2a.weight``, ..., ``bn7.running_var``), followed by the head ``fc8.weight`` (21 x 4096 x 1 x 1),
``f8_3.weight``, ``f8_4.weight``, ``f9.weight`` and ``f10.weight``. lit_wsss keeps the ``resnet38d`` names
under ``backbone.`` and calls fc8 ``classifier``; f8_3/f8_4/f9/f10 keep their names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_OFFICIAL_PREFIX = "resnet50."
# IRN registers the torchvision parts a second time as stage1..stage4 (SIPE likewise, grouped its own way).
_OFFICIAL_ALIAS = re.compile(r"^stage\d\.")

_DATAPARALLEL_PREFIX = "module."
# Top-level modules of resnet38d: conv1a, b2 .. b7 with their b<N>_<M> siblings, bn7.
_CPN_BACKBONE_KEY = re.compile(r"^(conv1a|bn7|b\d(_\d)?)\.")
_CPN_RENAMES = {"fc8.": "classifier."}  # other head keys (f8_3, f8_4, f9, f10) keep their names


def is_official_irn_state_dict(state: dict[str, Any]) -> bool:
    """True for the key layout of IRN's ``resnet50_cam.Net`` (and its ``CAM`` subclass)."""
    return any(key.startswith(_OFFICIAL_PREFIX) for key in state) and any(
        _OFFICIAL_ALIAS.match(key) for key in state
    )


def convert_official_irn_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an official IRN-family state dict onto lit_wsss names (``resnet50.X`` -> ``backbone.X``).

    The ``stageN.*`` entries are the same tensors registered a second time; each must be identical to some
    ``resnet50.*`` tensor (a mismatch means the file is not what it claims) and is dropped. The check is by
    value, not by IRN's stage-to-layer map, so SIPE's ``network/resnet50_SIPE.py`` (the same ResNet-50
    attribute, its own stage grouping, plus ``side1..side4`` and ``classifier``, sipe.md §2) converts too;
    every other key keeps its name.
    """
    twins: dict[tuple[int, ...], list[Tensor]] = {}
    for key, value in state.items():
        if key.startswith(_OFFICIAL_PREFIX):
            twins.setdefault(tuple(value.shape), []).append(value)
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(_OFFICIAL_PREFIX):
            converted["backbone." + key[len(_OFFICIAL_PREFIX) :]] = value
        elif _OFFICIAL_ALIAS.match(key):
            if not any(torch.equal(twin, value) for twin in twins.get(tuple(value.shape), [])):
                raise ValueError(f"official IRN/SIPE checkpoint: {key!r} has no identical resnet50.* twin")
        else:
            converted[key] = value
    return converted


def _strip_dataparallel(state: dict[str, Any]) -> dict[str, Any]:
    """Drops a ``module.`` prefix carried by every key (a model saved from ``nn.DataParallel``)."""
    if state and all(key.startswith(_DATAPARALLEL_PREFIX) for key in state):
        return {key[len(_DATAPARALLEL_PREFIX) :]: value for key, value in state.items()}
    return state


def is_official_cpn_state_dict(state: dict[str, Any]) -> bool:
    """True for the key layout of CPN's ``resnet38_CPN.Net``: top-level ``conv1a``, ``bn7``, ``fc8`` keys."""
    keys = set(_strip_dataparallel(state))
    return {"conv1a.weight", "bn7.weight", "fc8.weight"} <= keys


def convert_official_cpn_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an official CPN state dict onto lit_wsss names.

    ``module.`` (DataParallel) is stripped; ResNet-38 keys ``X`` become ``backbone.X``, ``fc8.weight`` becomes
    ``classifier.weight``; ``f8_3``, ``f8_4``, ``f9``, ``f10`` and any other key are kept as they are (an
    unknown key then shows up as unexpected when loading).
    """
    converted: dict[str, Tensor] = {}
    for key, value in _strip_dataparallel(state).items():
        rename = next((old for old in _CPN_RENAMES if key.startswith(old)), None)
        if rename is not None:
            key = _CPN_RENAMES[rename] + key[len(rename) :]
        elif _CPN_BACKBONE_KEY.match(key):
            key = "backbone." + key
        converted[key] = value
    return converted


def load_initial_state_dict(
    path: str | Path, module: nn.Module, allow_missing: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """Read ``path`` and return a state dict in ``module``'s key layout, ready for a strict load.

    Accepts a Lightning checkpoint (its ``state_dict``), an official IRN or CPN checkpoint, or a plain state
    dict. Keys starting with one of ``allow_missing`` may be absent from the file (they keep the module's own
    values).
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the missing and unexpected
    keys when the file does not fit the module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"init_weights: no such file {path}")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise ValueError(f"init_weights: {path} holds a {type(loaded).__name__}, expected a state dict")
    source = "lit_wsss/Lightning checkpoint"
    state = loaded.get("state_dict", loaded)
    if is_official_irn_state_dict(state):
        state = convert_official_irn_state_dict(state)
        source = "official IRN checkpoint"
    elif is_official_cpn_state_dict(state):
        state = convert_official_cpn_state_dict(state)
        source = "official CPN checkpoint"
    own = module.state_dict()
    # layers the file cannot have (e.g. GSLM's new pooling head on GLM weights) keep the module's values
    if allow_missing:
        state = {**{k: v for k, v in own.items() if k.startswith(allow_missing) and k not in state}, **state}
    expected = set(own)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"init_weights: {path} (read as {source}) does not fit {type(module).__name__}: "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    return state
