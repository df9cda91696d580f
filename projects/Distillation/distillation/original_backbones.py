"""The original DSIG repository's MobileNetV2 and EfficientNet-B0 students, with its module names
and numerics, so that its checkpoints (merged Student-Teacher files and trained detectors) load as
they are. Selected by MODEL.MOBILENETV2.LAYOUT / MODEL.EFFICIENTNET.LAYOUT = "original"; configs
written for the original repository select them (legacy.py).

- MobileNetV2 (the detectron2 port of tonylins/pytorch-mobilenet-v2 the original used): the same
  network as torchvision's, stored as ``features.0.{0,1}`` (stem) and
  ``features.N.conv.{0,1,3,4[,6,7]}`` (inverted residuals); no 1280-channel head.
- EfficientNet-B0 (lukemelas/EfficientNet-PyTorch layout): ``_conv_stem``, ``_bn0``,
  ``_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_se_reduce,_se_expand,_project_conv,_bn2}``.
  It differs numerically from torchvision's B0: TensorFlow "same" padding computed once for a
  224x224 input (so a stride-2 3x3 conv pads (0, 1) and a 5x5 one (1, 2), whatever the input),
  every norm with eps 1e-3, drop-connect 0.2 * block / 16 on the residual blocks when training.
Both were fed BGR images with ImageNet statistics in BGR order (the original's configs say so).
"""
import math
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import Backbone
from torch import nn
from torchvision.ops import stochastic_depth

LAYOUTS = ("torchvision", "original")

# (expand ratio t, channels c, repeats n, stride s) of the inverted residual groups
MOBILENETV2_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

# (repeats, kernel, stride, expand ratio, in, out, name of the stage ending with the group)
EFFICIENTNET_B0_GROUPS = [(1, 3, 1, 1, 32, 16, None), (2, 3, 2, 6, 16, 24, "e2"),
                          (2, 5, 2, 6, 24, 40, "e3"), (3, 3, 2, 6, 40, 80, None),
                          (3, 5, 1, 6, 80, 112, "e4"), (4, 5, 2, 6, 112, 192, None),
                          (1, 3, 1, 6, 192, 320, "e5")]
EFFICIENTNET_B0_STRIDES = {"e2": 4, "e3": 8, "e4": 16, "e5": 32}
EFFICIENTNET_IMAGE_SIZE = 224  # the size its static padding was computed for
EFFICIENTNET_NORM_EPS = 1e-3
EFFICIENTNET_NORM_MOMENTUM = 0.01  # 1 - TensorFlow's 0.99
SE_RATIO = 0.25


def check_layout(key: str, layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{key} = {layout!r}: expected one of {', '.join(LAYOUTS)}")


# --- MobileNetV2 --------------------------------------------------------------------------------

def _conv_norm_relu6(cin: int, cout: int, kernel: int, stride: int, norm: str, groups: int = 1):
    return [nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            get_norm(norm, cout), nn.ReLU6(inplace=True)]


class OriginalInvertedResidual(nn.Module):
    """Inverted residual whose ``conv`` Sequential is indexed as the original's checkpoints:
    [pw, norm, relu6,] dw, norm, relu6, pw-linear, norm."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int, norm: str):
        super().__init__()
        hidden = round(cin * expand_ratio)
        layers = []
        if expand_ratio != 1:
            layers += _conv_norm_relu6(cin, hidden, 1, 1, norm)
        layers += _conv_norm_relu6(hidden, hidden, 3, stride, norm, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), get_norm(norm, cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def original_mobilenetv2_features(norm: str, in_channels: int = 3) -> nn.Sequential:
    """The original's MobileNetV2 trunk (width 1.0): stem, then 17 inverted residuals; block
    indices equal torchvision's ``features`` indices."""
    layers: List[nn.Module] = [nn.Sequential(*_conv_norm_relu6(in_channels, 32, 3, 2, norm))]
    cin = 32
    for t, c, n, s in MOBILENETV2_SETTINGS:
        for i in range(n):
            layers.append(OriginalInvertedResidual(cin, c, s if i == 0 else 1, t, norm))
            cin = c
    features = nn.Sequential(*layers)
    for m in features.modules():  # the original's init: N(0, sqrt(2 / (k*k*out)))
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return features


# --- EfficientNet-B0 ----------------------------------------------------------------------------

def same_padding(size: int, kernel: int, stride: int):
    """TensorFlow "SAME" padding (before, after) of one dimension: output ceil(size / stride)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class StaticSamePaddingConv2d(nn.Conv2d):
    """A convolution zero-padded as TensorFlow's "SAME" for one fixed square input size; the same
    padding is applied to every input (as the original's static-padding convolutions)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 image_size: int = EFFICIENTNET_IMAGE_SIZE):
        super().__init__(cin, cout, kernel, stride, padding=0, groups=groups, bias=False)
        before, after = same_padding(image_size, kernel, stride)
        self.same_pad = (before, after, before, after)  # left, right, top, bottom

    def forward(self, x):
        if any(self.same_pad):
            x = F.pad(x, self.same_pad)
        return super().forward(x)


def _efficientnet_norm(norm: str, channels: int) -> nn.Module:
    layer = get_norm(norm, channels)
    layer.eps = EFFICIENTNET_NORM_EPS
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        layer.momentum = EFFICIENTNET_NORM_MOMENTUM
    return layer


class OriginalMBConvBlock(nn.Module):
    """Mobile inverted bottleneck with squeeze-excitation, in the original's names."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand_ratio: int,
                 image_size: int, norm: str, drop_connect: float):
        super().__init__()
        hidden = cin * expand_ratio
        self.expand = expand_ratio != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _efficientnet_norm(norm, hidden)
        self._depthwise_conv = StaticSamePaddingConv2d(hidden, hidden, kernel, stride,
                                                       groups=hidden, image_size=image_size)
        self._bn1 = _efficientnet_norm(norm, hidden)
        squeezed = max(1, int(cin * SE_RATIO))
        self._se_reduce = nn.Conv2d(hidden, squeezed, 1)
        self._se_expand = nn.Conv2d(squeezed, hidden, 1)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _efficientnet_norm(norm, cout)
        self.residual = stride == 1 and cin == cout
        self.drop_connect = drop_connect

    def forward(self, x):
        h = x
        if self.expand:
            h = F.silu(self._bn0(self._expand_conv(h)))
        h = F.silu(self._bn1(self._depthwise_conv(h)))
        scale = self._se_expand(F.silu(self._se_reduce(F.adaptive_avg_pool2d(h, 1))))
        h = self._bn2(self._project_conv(torch.sigmoid(scale) * h))
        if not self.residual:
            return h
        if self.drop_connect > 0:  # per-image drop of the residual branch, rescaled by 1/keep
            h = stochastic_depth(h, self.drop_connect, "row", self.training)
        return h + x


def _freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return FrozenBatchNorm2d.convert_frozen_batchnorm(module)


class OriginalEfficientNetB0(Backbone):
    """EfficientNet-B0 in the original's layout; outputs e2..e5 (strides 4..32) at the last block
    of their groups. freeze_at: 1 = the stem, k = stem and stages up to the (k-1)-th named stage
    (the original ignored it; its configs use 0)."""

    def __init__(self, out_features: Sequence[str], norm: str = "FrozenBN", freeze_at: int = 0,
                 drop_connect_rate: float = 0.2, in_channels: int = 3):
        super().__init__()
        unknown = set(out_features) - set(EFFICIENTNET_B0_STRIDES)
        if unknown:
            raise ValueError(f"unknown out_features {sorted(unknown)}; available "
                             f"{list(EFFICIENTNET_B0_STRIDES)}")
        self._conv_stem = StaticSamePaddingConv2d(in_channels, 32, 3, 2)
        self._bn0 = _efficientnet_norm(norm, 32)
        total = sum(group[0] for group in EFFICIENTNET_B0_GROUPS)
        size = math.ceil(EFFICIENTNET_IMAGE_SIZE / 2)
        blocks: List[nn.Module] = []
        self._stage_end: Dict[int, str] = {}
        channels = {}
        for repeats, kernel, stride, expand, cin, cout, name in EFFICIENTNET_B0_GROUPS:
            for i in range(repeats):
                s = stride if i == 0 else 1
                rate = drop_connect_rate * len(blocks) / total
                blocks.append(OriginalMBConvBlock(cin if i == 0 else cout, cout, kernel, s, expand,
                                                  size, norm, rate))
                size = math.ceil(size / s)
            if name:
                self._stage_end[len(blocks) - 1] = name
                channels[name] = cout
        self._blocks = nn.ModuleList(blocks)
        self._out_features = list(out_features)
        self._out_feature_channels = channels
        self._out_feature_strides = dict(EFFICIENTNET_B0_STRIDES)
        self._last_block = max(i for i, n in self._stage_end.items() if n in out_features)
        if freeze_at > 0:
            self._conv_stem = _freeze(self._conv_stem)
            self._bn0 = _freeze(self._bn0)
            ends = sorted(self._stage_end)[: freeze_at - 1]
            for block in self._blocks[: (ends[-1] + 1) if ends else 0]:
                _freeze(block)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = F.silu(self._bn0(self._conv_stem(x)))
        out = {}
        for i, block in enumerate(self._blocks):
            x = block(x)
            name = self._stage_end.get(i)
            if name in self._out_features:
                out[name] = x
            if i == self._last_block:
                break
        return out

    def output_shape(self):
        return {n: ShapeSpec(channels=self._out_feature_channels[n],
                             stride=self._out_feature_strides[n]) for n in self._out_features}


# --- which layout a set of weights is in --------------------------------------------------------

ORIGINAL_KEY_MARKS = {
    "MobileNetV2": ("backbone.bottom_up.features.1.conv.0.weight", "features.1.conv.0.0.weight"),
    "EfficientNet-B0": ("backbone.bottom_up._conv_stem.weight", "features.1.0.block.0.0.weight"),
}


def backbone_layout_mismatch(weights, model_keys) -> str:
    """A message when ``weights`` hold a MobileNetV2 / EfficientNet-B0 backbone in one layout and
    the model expects the other (empty when they agree or neither applies)."""
    for arch, (original, torchvision) in ORIGINAL_KEY_MARKS.items():
        torchvision = "backbone.bottom_up." + torchvision
        if original in weights and torchvision in model_keys:
            key = "MOBILENETV2" if arch == "MobileNetV2" else "EFFICIENTNET"
            return (f"these weights hold a {arch} backbone in the original DSIG repository's "
                    f"layout ({original}) but the model is built with torchvision's layout: set "
                    f"MODEL.{key}.LAYOUT \"original\" (and feed it as the original did: "
                    "INPUT.FORMAT \"BGR\" with PIXEL_MEAN/PIXEL_STD in BGR order), or load the "
                    "original's config, which selects it")
        if torchvision in weights and original in model_keys:
            key = "MOBILENETV2" if arch == "MobileNetV2" else "EFFICIENTNET"
            return (f"these weights hold a {arch} backbone in torchvision's layout "
                    f"({torchvision}) but the model is built with the original DSIG layout "
                    f"(MODEL.{key}.LAYOUT \"original\"): set it to \"torchvision\"")
    return ""
