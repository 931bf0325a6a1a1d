"""Reading weights people already have: official IRN checkpoints, lit_wsss checkpoints, plain state dicts.

Every file is read with ``torch.load(..., weights_only=True)``: no pickled code is ever executed.

Official IRN layout (``jiwoon-ahn/irn`` ``net/resnet50_cam.py``, saved by ``step/train_cam.py`` as
``res50_cam.pth``): the ResNet-50 is an attribute ``resnet50`` and its parts are registered a second time
as ``stage1`` ... ``stage4``, so every backbone tensor appears twice, e.g. ``resnet50.layer1.0.conv1.weight``
and ``stage1.4.0.conv1.weight``; the classifier is ``classifier.weight`` (20 x 2048 x 1 x 1). lit_wsss keeps
torchvision's names under ``backbone.``, so the conversion is a prefix swap plus dropping the aliases.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

_OFFICIAL_PREFIX = "resnet50."
# IRN registers the torchvision parts a second time: stage1 = (conv1, bn1, relu, maxpool, layer1),
# stage2 = (layer2,), stage3 = (layer3,), stage4 = (layer4,).
_OFFICIAL_ALIASES = {
    "stage1.0.": "conv1.",
    "stage1.1.": "bn1.",
    "stage1.4.": "layer1.",
    "stage2.0.": "layer2.",
    "stage3.0.": "layer3.",
    "stage4.0.": "layer4.",
}
_OFFICIAL_ALIAS = re.compile(r"^stage\d\.")


def is_official_irn_state_dict(state: dict[str, Any]) -> bool:
    """True for the key layout of IRN's ``resnet50_cam.Net`` (and its ``CAM`` subclass)."""
    return any(key.startswith(_OFFICIAL_PREFIX) for key in state) and any(
        _OFFICIAL_ALIAS.match(key) for key in state
    )


def convert_official_irn_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an official IRN CAM state dict onto lit_wsss names (``resnet50.X`` -> ``backbone.X``).

    The ``stageN.*`` entries are the same tensors registered twice; each is checked against its
    ``resnet50.*`` twin (a mismatch means the file is not what it claims) and dropped.
    """
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(_OFFICIAL_PREFIX):
            converted["backbone." + key[len(_OFFICIAL_PREFIX) :]] = value
        elif _OFFICIAL_ALIAS.match(key):
            alias = next((a for a in _OFFICIAL_ALIASES if key.startswith(a)), None)
            twin = None if alias is None else state.get(
                _OFFICIAL_PREFIX + _OFFICIAL_ALIASES[alias] + key[len(alias) :]
            )
            if twin is None or not torch.equal(twin, value):
                raise ValueError(f"official IRN checkpoint: {key!r} has no identical resnet50.* twin")
        else:
            converted[key] = value
    return converted


def load_initial_state_dict(path: str | Path, module: nn.Module) -> dict[str, Tensor]:
    """Read ``path`` and return a state dict in ``module``'s key layout, ready for a strict load.

    Accepts a Lightning checkpoint (its ``state_dict``), an official IRN checkpoint, or a plain state dict.
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
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"init_weights: {path} (read as {source}) does not fit {type(module).__name__}: "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    return state
