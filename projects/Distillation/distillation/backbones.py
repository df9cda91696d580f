"""MobileNetV2 and EfficientNet-B0 students as detectron2 FPN backbones. LAYOUT "torchvision"
(default): torchvision's model definitions, so torchvision ImageNet weights load (RGB input,
ImageNet mean/std); "original": the original DSIG repository's modules (original_backbones.py)."""
from typing import Dict, Sequence

import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool, LastLevelP6P7
from torch import nn

from .original_backbones import (OriginalEfficientNetB0, check_layout,
                                 original_mobilenetv2_features)

# (name, index of the last torchvision `features` block of the stage, channels, stride)
MOBILENETV2_STAGES = [("m2", 3, 24, 4), ("m3", 6, 32, 8), ("m4", 13, 96, 16), ("m5", 17, 320, 32)]
EFFICIENTNET_B0_STAGES = [("e2", 2, 24, 4), ("e3", 3, 40, 8), ("e4", 5, 112, 16),
                          ("e5", 7, 320, 32)]


def _replace_norm(module: nn.Module, norm: str) -> nn.Module:
    """BatchNorm2d -> the configured norm (FrozenBN keeps ImageNet statistics frozen)."""
    if norm == "BN":
        return module
    if norm == "FrozenBN":
        return FrozenBatchNorm2d.convert_frozen_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            new = get_norm(norm, child.num_features)
            setattr(module, name, new)
        else:
            _replace_norm(child, norm)
    return module


class StagesBackbone(Backbone):
    """A Sequential trunk (torchvision's `features`) cut into named stages."""

    def __init__(self, features: nn.Sequential, stages, out_features: Sequence[str],
                 freeze_at: int = 0):
        super().__init__()
        names = [s[0] for s in stages]
        unknown = set(out_features) - set(names)
        if unknown:
            raise ValueError(f"unknown out_features {sorted(unknown)}; available {names}")
        last = max(s[1] for s in stages if s[0] in out_features)
        self.features = nn.Sequential(*list(features.children())[: last + 1])
        self._stage_end = {s[1]: s[0] for s in stages if s[0] in out_features}
        self._out_features = list(out_features)
        self._out_feature_channels = {s[0]: s[2] for s in stages}
        self._out_feature_strides = {s[0]: s[3] for s in stages}
        # freeze_at: 1 = the stem, k = stem and stages up to the (k-1)-th named stage
        if freeze_at > 0:
            ends = [0] + [s[1] for s in stages]
            for block in list(self.features.children())[: ends[min(freeze_at, len(ends)) - 1] + 1]:
                for p in block.parameters():
                    p.requires_grad_(False)
                FrozenBatchNorm2d.convert_frozen_batchnorm(block)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        for i, block in enumerate(self.features):
            x = block(x)
            if i in self._stage_end:
                out[self._stage_end[i]] = x
        return out

    def output_shape(self):
        return {n: ShapeSpec(channels=self._out_feature_channels[n],
                             stride=self._out_feature_strides[n]) for n in self._out_features}


def build_mobilenetv2(cfg) -> StagesBackbone:
    from torchvision.models import mobilenet_v2

    c = cfg.MODEL.MOBILENETV2
    check_layout("MODEL.MOBILENETV2.LAYOUT", c.LAYOUT)
    if c.LAYOUT == "original":
        features = original_mobilenetv2_features(c.NORM)
    else:
        features = _replace_norm(mobilenet_v2(weights=None), c.NORM).features
    return StagesBackbone(features, MOBILENETV2_STAGES, c.OUT_FEATURES, c.FREEZE_AT)


def build_efficientnet_b0(cfg) -> Backbone:
    from torchvision.models import efficientnet_b0

    c = cfg.MODEL.EFFICIENTNET
    check_layout("MODEL.EFFICIENTNET.LAYOUT", c.LAYOUT)
    if c.LAYOUT == "original":
        return OriginalEfficientNetB0(c.OUT_FEATURES, c.NORM, c.FREEZE_AT, c.STOCHASTIC_DEPTH)
    net = efficientnet_b0(weights=None, stochastic_depth_prob=c.STOCHASTIC_DEPTH)
    net = _replace_norm(net, c.NORM)
    return StagesBackbone(net.features, EFFICIENTNET_B0_STAGES, c.OUT_FEATURES, c.FREEZE_AT)


def _fpn(cfg, bottom_up, top_block):
    return FPN(bottom_up=bottom_up, in_features=cfg.MODEL.FPN.IN_FEATURES,
               out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM,
               top_block=top_block, fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_fpn_backbone(cfg, input_shape: ShapeSpec):
    """MobileNetV2 + FPN (p2-p6, P6 by max-pool) for Faster R-CNN."""
    return _fpn(cfg, build_mobilenetv2(cfg), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_efficientnet_b0_fpn_backbone(cfg, input_shape: ShapeSpec):
    """EfficientNet-B0 + FPN (p2-p6, P6 by max-pool) for Faster R-CNN."""
    return _fpn(cfg, build_efficientnet_b0(cfg), LastLevelMaxPool())


def _retinanet_top_block(cfg, bottom_up):
    in_feature = cfg.MODEL.FPN.IN_FEATURES[-1]
    in_channels = bottom_up.output_shape()[in_feature].channels
    return LastLevelP6P7(in_channels, cfg.MODEL.FPN.OUT_CHANNELS, in_feature=in_feature)


@BACKBONE_REGISTRY.register()
def build_retinanet_mobilenetv2_fpn_backbone(cfg, input_shape: ShapeSpec):
    """MobileNetV2 + FPN for RetinaNet: P6/P7 from the last backbone stage."""
    bottom_up = build_mobilenetv2(cfg)
    return _fpn(cfg, bottom_up, _retinanet_top_block(cfg, bottom_up))


@BACKBONE_REGISTRY.register()
def build_retinanet_efficientnet_b0_fpn_backbone(cfg, input_shape: ShapeSpec):
    """EfficientNet-B0 + FPN for RetinaNet: P6/P7 from the last backbone stage."""
    bottom_up = build_efficientnet_b0(cfg)
    return _fpn(cfg, bottom_up, _retinanet_top_block(cfg, bottom_up))


