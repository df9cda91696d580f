#!/usr/bin/env python
"""Convert a torchvision ImageNet checkpoint into a student initialisation file.

Supported: resnet18/50/101/152 (-> detectron2 ResNet names), mobilenet_v2, efficientnet_b0
(-> this project's backbones); and the ImageNet files of the original DSIG repository's own
student layouts (MODEL.*.LAYOUT "original"): tonylins_mobilenet_v2 (mobilenet_v2.pth.tar),
lukemelas_efficientnet_b0 (efficientnet-b0-355c32eb.pth), which the original fed BGR.
The output holds {"model": {"backbone.bottom_up.*": tensor}} and
loads as MODEL.WEIGHTS of a student (or of a stock detectron2 model with that backbone).
torchvision weights expect RGB input with ImageNet statistics: set INPUT.FORMAT "RGB",
MODEL.PIXEL_MEAN [123.675, 116.28, 103.53], MODEL.PIXEL_STD [58.395, 57.12, 57.375].

Configs can name the same weights as MODEL.WEIGHTS "torchvision://ARCH", which downloads and
converts them on first use (distillation/weights.py); this tool is for air-gapped machines.

Usage: python convert_torchvision_backbone.py ARCH INPUT.pth OUTPUT.pth
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distillation.weights import (ARCHS, ORIGINAL_LAYOUT_ARCHS,  # noqa: E402,F401
                                  convert)  # (convert: tests/tools_convert.py)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch", choices=ARCHS + ORIGINAL_LAYOUT_ARCHS)
    p.add_argument("input")
    p.add_argument("output")
    a = p.parse_args()
    state = torch.load(a.input, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state.get("model", state))
    weights = convert(a.arch, state)
    author = "original-layout" if a.arch in ORIGINAL_LAYOUT_ARCHS else "torchvision"
    torch.save({"model": weights, "__author__": author, "__arch__": a.arch}, a.output)
    print(f"wrote {len(weights)} tensors to {a.output}")


if __name__ == "__main__":
    main()
