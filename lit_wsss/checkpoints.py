"""Reading weights people already have: official checkpoints of every method, lit_wsss checkpoints, state dicts.

Every file is read with ``torch.load(..., weights_only=True)``: no pickled code is ever executed. A file is
unwrapped first (Lightning's ``state_dict``, SIPE's ``{"net": ...}``, a ``module.`` prefix on every key from
``nn.DataParallel``), then its key layout is recognised and mapped onto lit_wsss names. lit_wsss keeps
torchvision's ResNet names under ``backbone.`` (``backbone.conv1``, ``backbone.layer1.0.conv1``, ...).

Official layouts (the key facts come from issue 13's audit of the official code; docs/fidelity.md):

* **IRN** ``jiwoon-ahn/irn`` ``net/resnet50_cam.py`` (``res50_cam.pth``): the ResNet-50 is an attribute
  ``resnet50``; its parts are registered again as ``stage1`` (conv1, bn1, relu, maxpool, layer1) ...
  ``stage4`` and once more through ``self.backbone = nn.ModuleList([stage1..stage4])``; the classifier
  (20 x 2048 x 1 x 1, no bias) also sits in ``self.newly_added = nn.ModuleList([classifier])``. So every
  tensor has up to three names: ``resnet50.layer1.0.conv1.weight``, ``stage1.4.0.conv1.weight``,
  ``backbone.0.4.0.conv1.weight``; ``classifier.weight`` and ``newly_added.0.weight``.
* **SIPE** ``chenqi1126/SIPE`` ``network/resnet50_SIPE.py``, saved by ``train_resnet50_SIPE.py`` as
  ``{"net": state_dict}``: the same ``resnet50`` attribute, grouped ``stage0`` (stem) .. ``stage4``, both
  module lists (``newly_added`` = classifier, side1..side4): 964 keys for 323 tensors.
* **VWE** ``rulixiang/vwe`` ``network/resnet_cam.py``: the ResNet is ``resnet`` (not ``resnet50``), stages and
  module lists as IRN (``newly_added`` = classifier, VWE, fc_a, fc_b); the codebook is the parameter
  ``VWE.centroid`` of shape (K, 2048, 1, 1), lit_wsss's ``codebook`` is (K, 2048).
* **GSLM** ``tmlr-group/GSLM`` ``net/extractor/resnet50_cam.py`` (the GLM) and ``resnet50_wam.py`` (the SLM):
  the ResNet is a local variable and the module lists are plain Python lists, so the ``stage1..stage4`` keys
  (IRN's grouping) are the only names of the backbone; ``classifier.weight``; the SLM's pooling head is
  ``mapping = nn.Sequential(nn.AdaptiveAvgPool2d(32), nn.Conv2d(C, C, 32, bias=False))``, i.e.
  ``mapping.1.weight``, lit_wsss's ``pool.weight``.
* **CPN** ``Ferenas/CPN`` ``network/resnet38_CPN.py`` ``Net``: the ResNet-38 is the Net itself, so its keys
  are top level (``conv1a.weight``, ``b2.bn_branch2a.weight``, ..., ``bn7.running_var``), then the head
  ``fc8.weight`` (21 x 4096 x 1 x 1), ``f8_3``, ``f8_4``, ``f9``, ``f10``. lit_wsss keeps the ``resnet38d``
  names under ``backbone.`` and calls fc8 ``classifier``.

Aliases (a tensor registered under a second name) are dropped only after checking that each one is the same
tensor as a primary key (shared storage, else equal values): a file whose alias differs is not what it
claims to be, and the error names the key. A file that does not fit the module names its missing and
unexpected keys.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lit_wsss.errors import MissingWeightsFileError, WeightsFileError

_DATAPARALLEL_PREFIX = "module."
#: torchvision ResNet parts in IRN's stage grouping (IRN, VWE, GSLM): stage1 = conv1, bn1, relu, maxpool, layer1
_IRN_STAGES = {"stage1.0.": "conv1.", "stage1.1.": "bn1.", "stage1.4.": "layer1.", "stage2.0.": "layer2.",
               "stage3.0.": "layer3.", "stage4.0.": "layer4."}
#: second (and third) names of tensors in the IRN family: stage Sequentials, the backbone / newly_added lists
_IRN_FAMILY_ALIAS = re.compile(r"^(stage\d\.|backbone\.\d+\.|newly_added\.\d+\.)")
# Top-level modules of resnet38d: conv1a, b2 .. b7 with their b<N>_<M> siblings, bn7.
_CPN_BACKBONE_KEY = re.compile(r"^(conv1a|bn7|b\d(_\d)?)\.")
_CPN_RENAMES = {"fc8.": "classifier."}  # other head keys (f8_3, f8_4, f9, f10) keep their names


_ZIP_MAGIC = b"PK\x03\x04"
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def check_weights_file(path: str | Path, what: str, hint: str = "a state dict saved with torch.save",
                       zip_only: bool = False) -> bool:
    """The checks of :func:`read_weights_file` that need no loading: the file exists, is not empty and, when it
    is a zip archive (torch.save's format since torch 1.6), is a whole one; ``zip_only`` refuses the legacy
    format too (a Lightning checkpoint is always a zip archive). Returns whether it is a zip archive."""
    path = Path(path)
    expected = f"expected {hint}"
    if not path.is_file():
        raise MissingWeightsFileError(f"{what}: no such file {path} ({expected})")
    size = path.stat().st_size
    if size == 0:
        raise WeightsFileError(f"{what}: {path} is empty (0 bytes); {expected}")
    with open(path, "rb") as handle:
        is_zip = handle.read(4) == _ZIP_MAGIC
    if is_zip and not zipfile.is_zipfile(path):
        raise WeightsFileError(f"{what}: {path} is a truncated or damaged zip archive ({size} bytes); {expected} "
                               "(download or copy it again)")
    if zip_only and not is_zip:
        raise WeightsFileError(f"{what}: {path} is not a zip archive ({size} bytes), the format torch.save has "
                               f"written since torch 1.6; {expected}")
    return is_zip


def read_weights_file(path: str | Path, what: str, hint: str = "a state dict saved with torch.save") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, the one place lit_wsss reads a weights file.

    Every failure is a :class:`~lit_wsss.errors.WeightsFileError` (``MissingWeightsFileError`` for a missing
    file) whose message starts with ``what`` (the option, e.g. ``pretrained``) and the path, and says what was
    expected instead of torch's long explanation. A file with pickled Python objects keeps failing: it is
    never retried without ``weights_only``.
    """
    path = Path(path)
    expected = f"expected {hint}"
    is_zip = check_weights_file(path, what, hint)
    size = path.stat().st_size
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises pickle, zip, EOF and OS errors alike
        unsafe = _UNSAFE_GLOBAL.search(str(error))
        if unsafe:
            raise WeightsFileError(
                f"{what}: {path} holds pickled Python objects ({unsafe.group(1)}), which lit_wsss never loads "
                f"(torch.load weights_only=True); {expected}: save model.state_dict() instead") from None
        kind = ("a zip archive torch.load cannot read" if is_zip else
                "not a file written by torch.save (neither a zip archive nor a legacy torch pickle)")
        raise WeightsFileError(f"{what}: {path} is {kind} ({size} bytes, {type(error).__name__}); {expected}") from None


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.numel() and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and (
        a.storage_offset() == b.storage_offset() and a.stride() == b.stride()
    ):
        return True  # torch.save keeps shared storage: the usual case for a registered alias
    return torch.equal(a, b)


def drop_aliases(state: dict[str, Tensor], alias: re.Pattern[str], layout: str) -> dict[str, Tensor]:
    """``state`` without the keys matching ``alias``, each checked to be a copy of a key that does not match.

    Raises:
        ValueError: naming the first alias that has no identical primary tensor.
    """
    primary = {key: value for key, value in state.items() if not alias.match(key)}
    by_shape: dict[tuple[int, ...], list[Tensor]] = {}
    for value in primary.values():
        by_shape.setdefault(tuple(value.shape), []).append(value)
    for key, value in state.items():
        if key in primary:
            continue
        if not any(_same_tensor(value, twin) for twin in by_shape.get(tuple(value.shape), [])):
            raise ValueError(f"{layout}: {key!r} is registered as a second name of a tensor, but no other key "
                             "holds an identical tensor (a damaged or edited file?)")
    return primary


def _rename_prefixes(state: dict[str, Tensor], renames: dict[str, str]) -> dict[str, Tensor]:
    converted = {}
    for key, value in state.items():
        old = next((prefix for prefix in renames if key.startswith(prefix)), None)
        converted[key if old is None else renames[old] + key[len(old):]] = value
    return converted


# --- one converter per official layout ---------------------------------------------------------------------
def convert_official_irn_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """IRN / SIPE layout -> lit_wsss: aliases checked and dropped, ``resnet50.X`` -> ``backbone.X``; every
    other key (``classifier``, SIPE's ``side1..side4``) keeps its name."""
    state = drop_aliases(state, _IRN_FAMILY_ALIAS, "official IRN/SIPE checkpoint")
    return _rename_prefixes(state, {"resnet50.": "backbone."})


def convert_official_vwe_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """VWE layout -> lit_wsss: aliases checked and dropped, ``resnet.X`` -> ``backbone.X``,
    ``VWE.centroid`` (K, D, 1, 1) -> ``codebook`` (K, D); ``classifier``, ``fc_a``, ``fc_b`` keep their names."""
    state = drop_aliases(state, _IRN_FAMILY_ALIAS, "official VWE checkpoint")
    state = _rename_prefixes(state, {"resnet.": "backbone."})
    if "VWE.centroid" in state:
        centroid = state.pop("VWE.centroid")
        if centroid.dim() != 4 or centroid.shape[2:] != (1, 1):
            raise ValueError(f"official VWE checkpoint: VWE.centroid has shape {tuple(centroid.shape)}, "
                             "expected (K, D, 1, 1)")
        state["codebook"] = centroid.flatten(1)
    return state


def convert_official_gslm_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """GSLM layout -> lit_wsss: ``stageN.M.X`` -> ``backbone.<torchvision name>.X`` (IRN's grouping),
    ``mapping.1.weight`` -> ``pool.weight`` (the SLM's pooling head); ``classifier`` keeps its name."""
    renames = {old: "backbone." + new for old, new in _IRN_STAGES.items()}
    renames["mapping.1."] = "pool."
    return _rename_prefixes(state, renames)


def convert_official_cpn_state_dict(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPN layout -> lit_wsss: ResNet-38 keys ``X`` -> ``backbone.X``, ``fc8.weight`` -> ``classifier.weight``;
    ``f8_3``, ``f8_4``, ``f9``, ``f10`` and any other key keep their names (an unknown key then shows up as
    unexpected when loading); a ``module.`` prefix is stripped."""
    converted: dict[str, Tensor] = {}
    for key, value in strip_dataparallel(state).items():
        rename = next((old for old in _CPN_RENAMES if key.startswith(old)), None)
        if rename is not None:
            key = _CPN_RENAMES[rename] + key[len(rename):]
        elif _CPN_BACKBONE_KEY.match(key):
            key = "backbone." + key
        converted[key] = value
    return converted


@dataclass(frozen=True)
class OfficialLayout:
    """A released code base's key layout: how to recognise it and how to convert it."""

    name: str
    matches: Callable[[dict[str, Any]], bool]
    convert: Callable[[dict[str, Tensor]], dict[str, Tensor]]


def _has_prefix(state: dict[str, Any], prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state)


#: Tried in order; the first match converts the file.
OFFICIAL_LAYOUTS: tuple[OfficialLayout, ...] = (
    OfficialLayout("official IRN/SIPE checkpoint", lambda s: _has_prefix(s, "resnet50.") and _has_prefix(s, "stage"),
                   convert_official_irn_state_dict),
    OfficialLayout("official VWE checkpoint", lambda s: _has_prefix(s, "resnet.") and _has_prefix(s, "stage"),
                   convert_official_vwe_state_dict),
    OfficialLayout("official GSLM checkpoint",
                   lambda s: {"stage1.0.weight", "stage4.0.0.conv1.weight", "classifier.weight"} <= set(s),
                   convert_official_gslm_state_dict),
    OfficialLayout("official CPN checkpoint", lambda s: {"conv1a.weight", "bn7.weight", "fc8.weight"} <= set(s),
                   convert_official_cpn_state_dict),
)


def official_layout(state: dict[str, Any]) -> OfficialLayout | None:
    """The official layout ``state`` (already unwrapped, see :func:`unwrap_state_dict`) is in, if any."""
    return next((layout for layout in OFFICIAL_LAYOUTS if layout.matches(state)), None)


def strip_dataparallel(state: dict[str, Any]) -> dict[str, Any]:
    """Drops a ``module.`` prefix carried by every key (a model saved from ``nn.DataParallel``)."""
    if state and all(key.startswith(_DATAPARALLEL_PREFIX) for key in state):
        return {key[len(_DATAPARALLEL_PREFIX):]: value for key, value in state.items()}
    return state


def unwrap_state_dict(loaded: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The state dict inside a loaded file and where it was found.

    Lightning checkpoints keep it under ``state_dict``, SIPE's ``train_resnet50_SIPE.py`` under ``net``; a
    ``module.`` prefix on every key (a model saved from ``nn.DataParallel``) is stripped.
    """
    state, wrapper = loaded, ""
    for name in ("state_dict", "net"):
        inner = loaded.get(name)
        if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            state, wrapper = inner, f"[{name!r}]"
            break
    stripped = strip_dataparallel(state)
    if stripped is not state:
        wrapper += " (module. stripped)"
    return stripped, wrapper


def load_initial_state_dict(
    path: str | Path, module: nn.Module, allow_missing: tuple[str, ...] = ()
) -> dict[str, Tensor]:
    """Read ``path`` and return a state dict in ``module``'s key layout, ready for a strict load.

    Accepts a Lightning checkpoint (its ``state_dict``), an official checkpoint of IRN, SIPE, VWE, GSLM or CPN
    (module docstring), or a plain state dict. Keys starting with one of ``allow_missing`` may be absent from
    the file (they keep the module's own values).

    Raises:
        MissingWeightsFileError: the file does not exist (a ``FileNotFoundError``).
        WeightsFileError: (a ``ValueError``) the file is empty, damaged, holds pickled objects or no state
            dict, an alias is not a copy of its tensor, or the keys do not fit the module (the message names the missing and unexpected keys and how the file was read).
    """
    path = Path(path)
    loaded = read_weights_file(path, "init_weights", "a state dict or a Lightning checkpoint")
    if not isinstance(loaded, dict):
        raise WeightsFileError(f"init_weights: {path} holds a {type(loaded).__name__}, expected a state dict")
    state, wrapper = unwrap_state_dict(loaded)
    layout = official_layout(state)
    source = "lit_wsss/Lightning checkpoint or plain state dict"
    if layout is not None:
        try:
            state = layout.convert(state)
        except ValueError as error:
            raise WeightsFileError(f"init_weights: {path}: {error}") from None
        source = layout.name
    source += wrapper
    own = module.state_dict()
    # layers the file cannot have (e.g. GSLM's new pooling head on GLM weights) keep the module's values
    if allow_missing:
        state = {**{k: v for k, v in own.items() if k.startswith(allow_missing) and k not in state}, **state}
    expected = set(own)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise WeightsFileError(
            f"init_weights: {path} (read as {source}) does not fit {type(module).__name__}: "
            f"{len(missing)} missing keys {missing[:8]}, {len(unexpected)} unexpected keys {unexpected[:8]}"
        )
    return state
