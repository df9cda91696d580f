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

The input must hold the named architecture: its converted tensors are compared, by name and
shape, with those of that architecture (built without weights); a file of another architecture
(resnet18 weights named resnet50) is refused, naming the architecture it holds, and nothing is
written.

Usage: python convert_torchvision_backbone.py ARCH INPUT.pth OUTPUT.pth
"""
import argparse
import os
import sys

from typing import Dict, Tuple

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from distillation.checkpoint import read_checkpoint  # noqa: E402
from distillation.errors import InputError  # noqa: E402
from distillation.weights import (ARCHS, ORIGINAL_LAYOUT_ARCHS,  # noqa: E402,F401
                                  convert)  # (convert: tests/tools_convert.py)


def reference_shapes(arch: str) -> Dict[str, Tuple[int, ...]]:
    """{converted name: shape} of `arch`'s backbone, built on the meta device (shapes, no
    memory, no download)."""
    from torch import nn

    from distillation.original_backbones import (EFFICIENTNET_B0_STRIDES,
                                                 OriginalEfficientNetB0,
                                                 original_mobilenetv2_features)

    with torch.device("meta"):
        if arch == "tonylins_mobilenet_v2":
            model = nn.Module()
            model.features = original_mobilenetv2_features("BN")
        elif arch == "lukemelas_efficientnet_b0":
            model = OriginalEfficientNetB0(list(EFFICIENTNET_B0_STRIDES), norm="BN")
        else:
            model = torchvision.models.get_model(arch, weights=None)
    return {k: tuple(v.shape) for k, v in convert(arch, model.state_dict()).items()}


def holds(arch: str, state) -> bool:
    """Whether the state dict converts to exactly `arch`'s backbone (names and shapes)."""
    try:
        weights = convert(arch, state)
    except ValueError:  # none of its names
        return False
    shapes = reference_shapes(arch)
    return set(weights) == set(shapes) and all(tuple(v.shape) == shapes[k]
                                               for k, v in weights.items())


def architecture_mismatch(arch: str, state, weights) -> str:
    """Why the state dict (`weights`: converted as `arch`) is not `arch`'s backbone (empty when
    it is), naming the supported architecture it holds where one fits."""
    if holds(arch, state):
        return ""
    family = ARCHS if arch in ARCHS else ORIGINAL_LAYOUT_ARCHS
    held = [other for other in family if other != arch and holds(other, state)]
    if held:
        return f"the file holds {held[0]} weights, not {arch}: convert it as {held[0]}"
    expected = reference_shapes(arch)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(weights) & set(expected)
                   if tuple(weights[k].shape) != expected[k])
    detail = "; ".join(f"{what} ({len(keys)}), e.g. {keys[0]}" for what, keys in (
        ("missing", missing), ("not in the architecture", unexpected), ("wrong shape", wrong))
        if keys)
    return f"the file does not hold {arch} weights: {detail}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("arch", choices=ARCHS + ORIGINAL_LAYOUT_ARCHS)
    p.add_argument("input")
    p.add_argument("output")
    a = p.parse_args()
    try:
        state = read_checkpoint(a.input)
        if not isinstance(state, dict):
            raise InputError(f"{a.input} holds a {type(state).__name__}, not a state dict")
        state = state.get("state_dict", state.get("model", state))
        try:
            weights = convert(a.arch, state)
        except ValueError as e:  # nothing of the architecture's names in the file
            raise InputError(f"{a.input}: {e}") from None
        mismatch = architecture_mismatch(a.arch, state, weights)
        if mismatch:
            raise InputError(f"{a.input}: {mismatch}; nothing written")
    except InputError as e:
        print(f"convert_torchvision_backbone.py: {e}", file=sys.stderr)
        sys.exit(2)
    author = "original-layout" if a.arch in ORIGINAL_LAYOUT_ARCHS else "torchvision"
    torch.save({"model": weights, "__author__": author, "__arch__": a.arch}, a.output)
    print(f"wrote {len(weights)} tensors to {a.output}")


if __name__ == "__main__":
    main()
